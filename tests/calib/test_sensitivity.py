"""The budget's sensitivity pass (calib/sensitivity.py, sensitivity_parts.py) on its memory and its LM head:
  * the resident layer stays in the stored dtype: on a bf16 MoE no float32 tensor as big as a fused
    expert tensor is ever made (every aten op's output watched), an expert computes what the float32
    layer's does, and each layer is freed before the next one loads (one layer resident);
  * the LM head's types scored on a sample of the table's rows against the true KL of the float final
    states through the whole quantized table (our forward pass, tests/model: equal to transformers');
  * llama.cpp's CPU rounding of the inputs against libggml's own;
  * for --algorithm gptq files, the decoder Linears scored at error-feedback codes fitted on half of the
    windows and measured on the other half, and nothing else rescored."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gemmaquant.calib import sensitivity
from gemmaquant.calib.sensitivity import measure_sensitivity
from gemmaquant.calib.sensitivity_parts import Head, InputForms, head_sample, quantized
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.model.loading import load_layer, load_model
from gemmaquant.model.qlinear import DenseLinear
from gemmaquant.numerics.ggml.types import GGMLType as T

from tests.tiny_gemma4 import make_tiny_gemma4

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # transformers' tiny models
FEW = (T.Q2_K, T.Q4_0, T.Q8_0)  # the reference type Q4_0 and two others


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sens")
    make_tiny_gemma4("moe", root / "moe", dtype=torch.bfloat16)
    make_tiny_gemma4("dense", root / "dense")
    return root


class LargestFloat32(TorchDispatchMode):
    """The most elements any float32 output of an aten op had while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta":
                self.largest = max(self.largest, t.numel())
        return out


def test_moe_layer_stays_bf16_no_float32_copy_of_a_fused_tensor(tiny, monkeypatch):
    ck = Checkpoint(tiny / "moe")
    fused = ck.tensor("model.layers.0.experts.gate_up_proj")
    assert fused.dtype == torch.bfloat16
    layer = load_layer(ck, 0, stored=True)
    assert layer.experts.gate_up_proj.dtype == layer.experts.down_proj.dtype == torch.bfloat16
    assert isinstance(layer.mlp.down_proj, DenseLinear) and layer.mlp.down_proj.weight.dtype == torch.bfloat16
    # one expert is cast where it runs: the same values as the float32 layer's
    f32 = load_layer(ck, 0)
    x = torch.randn(5, ck.config.hidden_size)
    assert torch.equal(layer.experts.expert(3, x), f32.experts.expert(3, x))
    ids = torch.randint(5, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    # each layer is gone (by reference counting: nothing refers back to it) before the next one loads
    loaded = []

    def spy(*a, **k):
        assert all(r() is None for r in loaded), "a module of the previous layer is still alive"
        layer = real(*a, **k)
        loaded.extend(weakref.ref(m) for m in layer.modules())
        return layer

    real = sensitivity.load_layer
    monkeypatch.setattr(sensitivity, "load_layer", spy)
    gc.disable()
    try:
        with LargestFloat32() as watch:
            rep = measure_sensitivity(ck, ids, kl_positions=4, batch_size=2, types=FEW, embed_types=FEW)
    finally:
        gc.enable()
    assert loaded and all(r() is None for r in loaded)
    assert "blk.0.ffn_gate_up_exps.weight" in rep.tensors
    # a float32 copy of the fused tensor (as the float32-resident pass made) has fused.numel() elements;
    # one expert's slice has 1/16 of them
    assert watch.largest < fused.numel() // 2, (watch.largest, fused.numel())


def _final_states(model, ids):
    """The float model's last hidden states (before the final norm) for ids."""
    with torch.no_grad():
        h, ctx = model.prepare(ids)
        for layer in model.layers:
            h = layer(h, ctx)
    return h


def _true_head_kl(ck, ids, pos, t, rounded=False):
    """KL of the float final states through the whole table at type t (tied head), our forward pass;
    `rounded`: the final normed states rounded first by libggml's own Q8_0/Q8_K row quantizer, as
    llama.cpp's CPU backend feeds them to a table of type t."""
    model = load_model(ck)
    h = _final_states(model, ids)[:, pos]
    with torch.no_grad():
        ref = model.head(h).double().log_softmax(-1)
        table = model.model.embed_tokens.weight
        table.copy_(quantized(table.detach().clone(), t, None))
        if rounded:
            from gemmaquant.model.qlinear import act_block
            from tests.numerics.ggml.libggml import ggml_round_activations

            norm = model.model.norm
            hook = norm.register_forward_hook(lambda _m, _a, y: ggml_round_activations(
                y.reshape(-1, y.shape[-1]), act_block(t)).reshape(y.shape))
        q = model.head(h).double().log_softmax(-1)
        if rounded:
            hook.remove()
    return float((ref.exp() * (ref - q)).sum(-1).mean())


@pytest.mark.parametrize("t", [T.Q4_0, T.IQ4_NL, T.Q8_0], ids=lambda t: t.name)
def test_head_kl_whole_and_sampled_against_the_true_kl(tiny, t):
    """A table within `max_rows` is scored whole (the true KL to float rounding); a bigger one on a sample
    of half its rows: within 20 % of the true KL here (benchmarks/head_sampling.py measures it on the
    demo's 262144 rows)."""
    ck = Checkpoint(tiny / "dense")
    ids = torch.randint(5, 300, (3, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16, 24)
    true = _true_head_kl(ck, ids, pos, t)
    h = _final_states(load_model(ck), ids)
    V = ck.config.vocab_size
    _, whole = Head(ck, pos, rows=100, max_rows=V).kls(h, [], [t])
    assert whole[t] == pytest.approx(true, rel=1e-6)
    _, half = Head(ck, pos, rows=100, max_rows=V // 2).kls(h, [], [t])
    assert half[t] != whole[t]  # sampled: not the whole-table computation
    assert half[t] == pytest.approx(true, rel=0.2)


@pytest.mark.llamacpp
@pytest.mark.parametrize("t", [T.Q4_0, T.Q8_0], ids=lambda t: t.name)
def test_head_kl_with_llamacpp_activation_rounding(tiny, t):
    """With `activations` the head's KL per type is the true KL of llama.cpp's CPU product: the final states
    rounded by libggml for the table's type (Q8_0 blocks of 32: the tiny model's 64 columns take no
    256-weight type), then through the quantized table; and more than the weights' alone."""
    ck = Checkpoint(tiny / "dense")
    ids = torch.randint(5, 300, (3, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16, 24)
    true = _true_head_kl(ck, ids, pos, t, rounded=True)
    h = _final_states(load_model(ck), ids)
    V = ck.config.vocab_size
    _, got = Head(ck, pos, rows=100, max_rows=V, activations=True).kls(h, [], [t])
    _, weights = Head(ck, pos, rows=100, max_rows=V).kls(h, [], [t])
    assert got[t] == pytest.approx(true, rel=1e-5)
    assert got[t] > weights[t]


def test_head_sample_takes_the_heaviest_rows_and_weights_the_rest_to_the_row_count():
    mass = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows, w = head_sample(mass, 200)
    assert len(rows) <= 200 and torch.all(rows[1:] > rows[:-1])
    heavy = set(mass.topk(50).indices.tolist())
    assert heavy <= set(rows.tolist())
    assert all(w[i] == 1.0 for i, r in enumerate(rows.tolist()) if r in heavy)
    assert float(w.sum()) == pytest.approx(1000)  # Σ weights estimates the row count exactly


@pytest.fixture(scope="module")
def demo_layer3(demo_dir):
    """The real demo's layer 3 on 4 windows of the built-in text: its InputForms with llama.cpp's
    activation rounding and the windows split in halves, and the float inputs of q_proj, o_proj and
    down_proj (window-major rows)."""
    from gemmaquant.calib.data import default_text, load_tokenizer_for
    from gemmaquant.calib.imatrix import llama_chunks
    from gemmaquant.calib.sensitivity_parts import InputForms

    ck = Checkpoint(demo_dir)
    tok = load_tokenizer_for(ck.path, rows=ck.config.vocab_size)
    ids = llama_chunks(tok.encode(default_text(), add_bos=True, parse_special=False), 256,
                       ck.config.bos_token_id)[:4]
    model = load_model(ck)
    layer = model.layers[3]
    forms = InputForms(layer, ids.numel(), activations=True, split=True)
    X, hooks = {}, []
    for sfx in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        hooks.append(layer.get_submodule(sfx).register_forward_pre_hook(
            lambda _m, a, s=sfx: X.setdefault(s, []).append(a[0].reshape(-1, a[0].shape[-1]).detach().float())))
    with torch.no_grad():
        model(ids, logits_from=ids.shape[1] - 1)
    for h in hooks:
        h.remove()
    forms.remove()
    return layer, forms, {s: torch.cat(v).double() for s, v in X.items()}


@pytest.mark.llamacpp
@pytest.mark.parametrize("sfx,qtype", [("mlp.down_proj", T.Q6_K), ("mlp.down_proj", T.Q4_K), ("mlp.down_proj", T.Q8_0),
                                       ("self_attn.o_proj", T.Q6_K), ("self_attn.o_proj", T.Q5_1),
                                       ("self_attn.q_proj", T.Q8_0), ("self_attn.q_proj", T.IQ4_NL)],
                         ids=lambda v: getattr(v, "name", v))
def test_activation_rounding_term_against_the_product_llamacpp_computes(demo_layer3, sfx, qtype):
    """What the sensitivity adds for llama.cpp's CPU rounding of a Linear's input (a per-channel sum,
    `InputForms.act_error`) against the exact error of the product llama.cpp computes, its input rounded
    by libggml's own Q8_0/Q8_K row quantizer: within 3 %, and with the weights' error the whole
    ||q8(X)Ŵᵀ − XWᵀ||² within 3 % (the cross terms average out; 0.3 % here), on a real Gemma 3 layer."""
    from tests.numerics.ggml.libggml import ggml_round_activations
    from gemmaquant.calib.ggml_calibrate import imatrix_of
    from gemmaquant.model.qlinear import act_block

    layer, forms, X = demo_layer3
    x = X[sfx]
    W = layer.get_submodule(sfx).weight.detach().float()
    Wq = quantized(W, qtype, imatrix_of(x.pow(2).sum(0), x.shape[0])).double()
    R = ggml_round_activations(x.float(), act_block(qtype)).double()
    exact_act = float(((R - x) @ Wq.T).pow(2).sum())
    est_act = forms.act_error(sfx, Wq, qtype)
    assert est_act == pytest.approx(exact_act, rel=0.03)
    whole = float((R @ Wq.T - x @ W.double().T).pow(2).sum())
    assert forms.error(sfx, W.double() - Wq) + est_act == pytest.approx(whole, rel=0.03)


@pytest.mark.llamacpp
def test_blocks_of_256_cost_more_than_blocks_of_32_on_the_geglu_output(demo_layer3):
    """Why the term matters: down_proj's input (the GeGLU output, a few large values per token) rounded in
    Q8_K blocks of 256 costs several times what Q8_0 blocks of 32 cost, for the same weights; q_proj's
    normed input much less so. Without `activations` the term is 0."""
    layer, forms, X = demo_layer3
    ratios = {}
    for sfx in ("mlp.down_proj", "self_attn.q_proj"):
        W = layer.get_submodule(sfx).weight.detach().double()
        if W.shape[1] % 256:
            ratios[sfx] = None
            continue
        ratios[sfx] = forms.act_error(sfx, W, T.Q6_K) / forms.act_error(sfx, W, T.Q8_0)
    assert ratios["mlp.down_proj"] > 3, ratios
    assert ratios["self_attn.q_proj"] is None  # 640 columns: no 256-weight type at all
    from gemmaquant.calib.sensitivity_parts import InputForms

    plain = InputForms(layer, 1)
    assert plain.act_error("mlp.down_proj", layer.mlp.down_proj.weight.detach(), T.Q6_K) == 0.0
    plain.remove()


def _halves(x: torch.Tensor, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(even windows' rows, odd windows' rows) of window-major rows x."""
    w = x.reshape(windows, -1, x.shape[-1])
    return w[0::2].reshape(-1, x.shape[-1]), w[1::2].reshape(-1, x.shape[-1])


@pytest.mark.parametrize("sfx,qtype", [("self_attn.q_proj", T.Q4_0), ("self_attn.q_proj", T.Q8_0),
                                       ("mlp.down_proj", T.Q6_K), ("mlp.down_proj", T.Q3_K)],
                         ids=lambda v: getattr(v, "name", v))
def test_feedback_codes_are_fitted_on_even_windows_and_scored_on_odd_ones(demo_layer3, sfx, qtype):
    """A real Gemma 3 layer: the error-feedback codes (what --algorithm gptq writes) fitted on the even
    windows' inputs beat llama.cpp's rounding on the odd windows, but by much less than on their own
    windows (why the sensitivity splits them); the score is llama.cpp's error on all windows times the
    odd windows' ratio, all checked against the inputs captured apart from InputForms."""
    from gemmaquant.calib.ggml_calibrate import imatrix_of, optimize_layer_tensor

    layer, forms, X = demo_layer3
    x = X[sfx]
    fit, held = _halves(x, 4)
    assert torch.allclose(forms.hessian(sfx, "fit").double(), fit.T @ fit, rtol=1e-4, atol=1e-3)
    assert torch.allclose(forms.hessian(sfx, "held").double(), held.T @ held, rtol=1e-4, atol=1e-3)
    W = layer.get_submodule(sfx).weight.detach().to(torch.bfloat16).float()
    imat = imatrix_of(x.pow(2).sum(0).float(), x.shape[0])
    e_llama, e_fb, act = sensitivity._linear_error(W, forms, sfx, qtype, imat, W.shape[0], {})
    Wq = quantized(W, qtype, imat).double()
    Wf = optimize_layer_tensor(W, (fit.T @ fit).float(), qtype, imat)[1].double()

    def err(rows, V):
        return float((rows @ (W.double() - V).T).pow(2).sum())

    assert e_llama == pytest.approx(err(x, Wq), rel=1e-4)
    ratio_held, ratio_fit = err(held, Wf) / err(held, Wq), err(fit, Wf) / err(fit, Wq)
    assert e_fb == pytest.approx(e_llama * ratio_held, rel=1e-3)
    assert act == pytest.approx(forms.act_error(sfx, Wf.float(), qtype), rel=1e-4)  # H summed in float32
    assert ratio_fit < ratio_held < 1.0, (ratio_fit, ratio_held)


def test_split_with_inputs_kept_as_rows_equals_the_grams(demo_layer3, monkeypatch):
    """A Linear input wider than the tokens (31B's down_proj) keeps X, not XᵀX: its halves and errors
    equal those of the XᵀX path."""
    layer, forms, X = demo_layer3
    monkeypatch.setattr(InputForms, "WIDE", 1000)
    kept = InputForms(layer, 1024, split=True)  # down_proj's 2048 inputs > 1024 tokens: rows kept
    fit, held = _halves(X["mlp.down_proj"], 4)
    with torch.no_grad():  # the same inputs in two calls of two windows, in window order
        w = X["mlp.down_proj"].float().reshape(4, -1, 2048)
        layer.mlp.down_proj(w[:2])
        layer.mlp.down_proj(w[2:])
    kept.remove()
    assert "mlp.down_proj" in kept.x
    D = torch.randn(8, 2048, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-3
    for part, rows in ((None, X["mlp.down_proj"]), ("fit", fit), ("held", held)):
        assert torch.allclose(kept.hessian("mlp.down_proj", part).double(), rows.T @ rows, rtol=1e-4, atol=1e-3)
        assert kept.error("mlp.down_proj", D, part) == pytest.approx(float((rows @ D.T).pow(2).sum()), rel=1e-6)
        assert forms.error("mlp.down_proj", D, part) == pytest.approx(float((rows @ D.T).pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_feedback_rescores_only_the_linears_gptq_writes(tiny, kind):
    """`feedback` changes the scores of the decoder Linears --algorithm gptq writes (stats.INPUT_OF) and
    nothing else: not the gains (measured with llama.cpp's rounding), the token table, Gemma 4's experts
    or its per-layer input Linears (which such a file holds at llama.cpp's rounding)."""
    from gemmaquant.calib.stats import INPUT_OF
    from gemmaquant.formats.gguf.names import gguf_name

    ck = Checkpoint(tiny / kind)
    ids = torch.randint(5, 250, (4, 16), generator=torch.Generator().manual_seed(1))
    args = dict(kl_positions=4, batch_size=2, types=FEW, embed_types=FEW)
    plain = measure_sensitivity(ck, ids, **args)
    fb = measure_sensitivity(ck, ids, feedback=True, **args)
    assert fb.layer_gain == plain.layer_gain
    assert set(fb.tensors) == set(plain.tensors)
    written = {gguf_name(f"model.layers.{i}.{s}.weight", ck.config.generation)
               for i in range(ck.config.num_hidden_layers) for s in INPUT_OF}
    rescored = {n for n in plain.tensors if fb.tensors[n].kl != plain.tensors[n].kl}
    assert rescored and rescored <= written
    assert "token_embd.weight" in plain.tensors and "token_embd.weight" not in rescored
    if kind == "moe":
        assert "blk.0.ffn_gate_up_exps.weight" in plain.tensors
    assert len(rescored) >= len(written & set(plain.tensors)) // 2
