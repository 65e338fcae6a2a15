"""Error-feedback rounding on the real demo model (Gemma 3 270M): its layers' calibration inputs from the
layer-by-layer runner, the layer-output error against llama.cpp's bytes for the same tensor, and
byte-identical reruns with 1 and 2 threads."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from gemmaquant.calib.data import default_text, load_tokenizer_for
from gemmaquant.calib.ggml_calibrate import imatrix_of, optimize_gguf_tensors, optimize_layer_tensor
from gemmaquant.calib.runner import run_layers
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.numerics.ggml.types import GGMLType
from gemmaquant.calib.imatrix import llama_chunks

T = GGMLType
# per Linear input width of the demo: 640 (q/k/v, gate/up) takes 32-weight blocks only
TYPES = {"self_attn.q_proj": T.Q4_0, "self_attn.v_proj": T.IQ4_NL, "self_attn.o_proj": T.Q3_K,
         "mlp.up_proj": T.Q5_1, "mlp.down_proj": T.IQ3_S}
# Not Q4_K: the demo's weights come from a Q4_K_M file, so llama.cpp's Q4_K re-quantization lands
# (nearly) on the codes they came from and no rounding can beat it by the 10% asked here.
MORE = {"self_attn.o_proj": [T.Q2_K, T.Q5_K, T.IQ4_XS, T.Q6_K], "mlp.down_proj": [T.Q5_K, T.Q8_0]}


@pytest.fixture(scope="module")
def ckpt(demo_dir):
    return Checkpoint(demo_dir)


@pytest.fixture(scope="module")
def ids(ckpt):
    tok = load_tokenizer_for(ckpt.path, rows=ckpt.config.vocab_size)
    return llama_chunks(tok.encode(default_text(), add_bos=True, parse_special=False), 256,
                        ckpt.config.bos_token_id)[:8]


@pytest.fixture(scope="module")
def layer1(ckpt, ids):
    """Layer 1's float weights and its Linears' input statistics (layer 0 quantized before it, as
    the sequential driver sees it)."""
    got = {}

    def on_layer(i, layer, stats):
        if i == 1:
            got.update({sfx: (layer.get_submodule(sfx).weight.detach().clone(), stats[f"model.layers.1.{sfx}"])
                        for sfx in list(TYPES) + ["self_attn.k_proj", "mlp.gate_proj"]})

    run_layers(ckpt, ids, kinds={"xtx", "sum_sq"}, on_layer=on_layer, sequential=True, layers=range(0, 2))
    return got


@pytest.mark.parametrize("sfx,qtype", [(s, t) for s, t in TYPES.items()] +
                         [(s, t) for s, ts in MORE.items() for t in ts], ids=lambda v: str(getattr(v, "name", v)))
def test_lower_layer_output_error_than_llamacpp_on_a_demo_layer(layer1, sfx, qtype):
    W, st = layer1[sfx]
    data, values, loss_llama, loss, optimized = optimize_layer_tensor(W, st.xtx, qtype, imatrix_of(st.sum_sq, st.count))
    assert optimized
    assert loss < 0.9 * loss_llama, (loss, loss_llama)
    from gguf.quants import dequantize as gguf_dequantize

    np.testing.assert_array_equal(gguf_dequantize(data.numpy(), int(qtype)).reshape(W.shape), values.numpy())


def test_streaming_driver_and_same_bytes_with_1_and_2_threads(ckpt, ids):
    # IQ3_S (the grid path) is checked on a layer above; here cheaper types keep the two runs short
    types = {"blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_output.weight": T.Q5_K,
             "blk.0.ffn_down.weight": T.Q2_K, "blk.1.ffn_up.weight": T.IQ4_NL, "blk.1.attn_k.weight": T.F32}
    digests = []
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = {}
            rep = optimize_gguf_tensors(ckpt, types, ids[:4], sink=lambda name, b: got.__setitem__(name, b),
                                        layers=range(0, 2))
            digests.append({k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in got.items()})
    finally:
        torch.set_num_threads(n)
    assert digests[0] == digests[1]
    assert set(digests[0]) == set(types) - {"blk.1.attn_k.weight"}  # F32: not a quantized type
    assert all(t.optimized and t.loss < t.loss_llama for t in rep.tensors)


def test_wide_inputs_wait_in_a_file_one_at_a_time(ckpt, ids, tmp_path, monkeypatch):
    """`park`: each wide input's XᵀX waits in a file until its Linears are rounded and while their codes
    are chosen. The bytes are those without parking; with it, no wide XᵀX is in memory when a Linear's
    turn comes, and only its factor while its codes are chosen (without: the o_proj's codes are chosen
    beside its own XᵀX and the down_proj's)."""
    import gc

    import gemmaquant.calib.ggml_calibrate as gcal
    import gemmaquant.calib.ggml_gptq as gg
    from gemmaquant.calib import hessian
    from gemmaquant.calib.spill import Held

    # every input of the demo is wide then: q/k/v's and gate/up's (640), o_proj's (1024), down_proj's (2048)
    monkeypatch.setattr(hessian, "WIDE", 600)
    types = {"blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_k.weight": T.Q4_0, "blk.0.attn_output.weight": T.Q5_K,
             "blk.0.ffn_gate.weight": T.Q4_0, "blk.0.ffn_down.weight": T.Q4_K}

    def wide_in_memory():  # n × n tensors, n > 600, made since the run began and still reachable
        gc.collect()
        return sum(1 for t in gc.get_objects() if type(t) is torch.Tensor and t.dim() == 2
                   and t.shape[0] == t.shape[1] > 600 and id(t) not in old_ids)

    def spy(orig, log):
        def call(*a, **k):
            log.append(wide_in_memory())
            return orig(*a, **k)
        return call

    parked = []

    class Counted(Held):
        def __init__(self, H, directory=None):
            parked.append(4 * H.numel() if directory else 0)
            super().__init__(H, directory)

    monkeypatch.setattr(gcal, "Held", Counted)
    monkeypatch.setattr(gcal, "optimize_layer_tensor", spy(gcal.optimize_layer_tensor, entry := []))
    monkeypatch.setattr(gg, "gptq_codes", spy(gg.gptq_codes, codes := []))
    digests = []
    for park in (None, tmp_path):
        entry.clear(), codes.clear()
        gc.collect()
        before = [t for t in gc.get_objects() if type(t) is torch.Tensor]  # alive: their ids stay theirs
        old_ids = {id(t) for t in before}
        got = {}
        optimize_gguf_tensors(ckpt, types, ids[:4], sink=lambda name, b: got.__setitem__(name, b),
                              layers=range(0, 1), park=park)
        digests.append({k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in got.items()})
        # q, k (sharing an input and its factor), o, gate, down; at k's turn q's XᵀX is back from q's losses
        if park is None:
            assert (entry, codes) == ([4, 5, 3, 2, 1], [5, 5, 4, 3, 2])
        else:
            assert (entry, codes) == ([0, 2, 0, 0, 0], [1, 1, 1, 1, 1])
        del before
    assert digests[0] == digests[1] and len(digests[0]) == 5
    # the disk the parked files take, as the output's disk check counts it
    assert sum(parked) == 4 * (640 ** 2 + 1024 ** 2 + 640 ** 2 + 2048 ** 2) == gcal.parked_bytes(ckpt)
    assert list(tmp_path.iterdir()) == []
