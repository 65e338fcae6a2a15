"""Layer-by-layer calibration on Gemma 4 against hooks on the whole model (one ordinary forward):
KV-shared layers (their K/V come from the producer's pass over the SAME mini-batch), per-layer inputs
(one layer's slice at a time), k_eq_v full layers (no v_proj), the MoE router and experts (per-expert
statistics of the tokens routed to each), the multimodal wrapper's media ids (embedded as pad)."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.calib.imatrix import ComputedImatrix, compute_imatrix
from gemmaquant.calib.runner import run_layers
from gemmaquant.calib.stats import ExpertStats
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.formats.gguf.imatrix import read_imatrix
from gemmaquant.model.loading import load_model
from gemmaquant.numerics.ct.grid import rtn

from tests.tiny_gemma4 import MEDIA_IDS, VOCAB, make_tiny_gemma4

SEQ = 20  # past the sliding window (8)


def _ids(n: int, seed: int, media: bool = False) -> torch.Tensor:
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2
    if media:
        ids[1, 3] = MEDIA_IDS[2]
    return ids


def _whole_model(model, ids) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, list]]]:
    """({decoder-layer Linear: its inputs [tokens, in] f64}, {experts param: {expert: [inputs]}})."""
    seen: dict[str, list] = {}
    experts: dict[str, dict[int, list]] = {}
    hooks = [m.register_forward_pre_hook(
        lambda _m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for i, layer in enumerate(model.layers):
        if hasattr(layer, "experts"):
            def obs(e, which, x, i=i):
                experts.setdefault(f"model.layers.{i}.experts.{which}_proj", {}).setdefault(e, []).append(x.double())
            layer.experts.observer = obs
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}, experts


@pytest.fixture(scope="module", params=["dense", "e2b", "moe", "e2b-mm"])
def tiny(request, tmp_path_factory):
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp(request.param)
    make_tiny_gemma4(request.param, d)
    return request.param, Checkpoint(d)


@pytest.mark.slow
def test_float_stats_equal_whole_model_hooks(tiny):
    kind, ck = tiny
    ids = _ids(5, 0, media=kind.endswith("-mm"))
    got = {}
    run_layers(ck, ids, kinds={"absmax", "sum_sq"}, sequential=False, batch_size=2,
               on_layer=lambda i, layer, st: got.update(st))
    ref, ref_experts = _whole_model(load_model(ck), ids)
    assert set(got) == set(ref) | set(ref_experts)
    cfg = ck.config
    for i in range(cfg.num_hidden_layers):  # only the Linears that run: no K/V on shared layers, no v on k_eq_v
        assert (f"model.layers.{i}.self_attn.k_proj" in got) == (not cfg.kv_shared(i))
        assert (f"model.layers.{i}.self_attn.v_proj" in got) == cfg.has_v_proj(i)
    for n, x in ref.items():
        assert got[n].count == x.shape[0] == 5 * SEQ
        torch.testing.assert_close(got[n].sum_sq, x.pow(2).sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[n].absmax.double(), x.abs().amax(0), rtol=1e-5, atol=1e-6)  # MoE: batch order
    for n, by_expert in ref_experts.items():
        st = got[n]
        assert isinstance(st, ExpertStats)
        assert st.counts == [sum(len(x) for x in by_expert.get(e, [])) for e in range(cfg.num_experts)]
        assert st.count == 5 * SEQ * cfg.top_k_experts
        for e, xs in by_expert.items():
            torch.testing.assert_close(st.per_expert[e].sum_sq, torch.cat(xs).pow(2).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_kv_shared_layers_see_the_modified_producer_when_sequential(tmp_path):
    """GPTQ's sequential mode on E2B-like: the shared layers attend with the K/V of the already
    quantized producer layer, batch by batch."""
    pytest.importorskip("transformers")
    make_tiny_gemma4("e2b", tmp_path)
    ck = Checkpoint(tmp_path)
    ids = _ids(3, 1)
    got, new = {}, {}

    def on_layer(i, layer, st):
        got.update({n: s.sum_sq.clone() for n, s in st.items()})
        for n, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(rtn(m.weight, 3, 16, True).dequantize())
                new[f"model.layers.{i}.{n}.weight"] = m.weight.clone()

    run_layers(ck, ids, kinds={"sum_sq"}, on_layer=on_layer, sequential=True, batch_size=2)
    model = load_model(ck)
    float_ref, _ = _whole_model(model, ids)
    n = ck.config.num_hidden_layers
    # statistics are taken before on_layer modifies the layer: the last layer float, the earlier ones not
    model.load_state_dict({k: v for k, v in new.items() if not k.startswith(f"model.layers.{n - 1}.")}, strict=False)
    quant_ref, _ = _whole_model(model, ids)
    last = f"model.layers.{n - 1}.self_attn.o_proj"  # its input: attention with the producer's K/V
    torch.testing.assert_close(got[last], quant_ref[last].pow(2).sum(0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got[last], float_ref[last].pow(2).sum(0), rtol=1e-3)


@pytest.mark.slow
def test_imatrix_names_and_counts_are_llama_imatrix_s(tmp_path):
    """GGUF names of every matrix llama-imatrix records on a MoE layer (router input included),
    per-expert counts for the fused experts; what they are worth is compared with llama-imatrix
    itself in test_imatrix_gemma4.py."""
    pytest.importorskip("transformers")
    make_tiny_gemma4("moe", tmp_path)
    ck = Checkpoint(tmp_path)
    ids = _ids(4, 2)
    ci = compute_imatrix(ck, ids=ids, dataset="t")
    assert {n for n in ci.sums if n.startswith("blk.1.")} == {
        f"blk.1.{t}.weight" for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                                      "ffn_gate_inp", "ffn_gate_up_exps", "ffn_down_exps")}  # full layer: k_eq_v
    assert "blk.0.attn_v.weight" in ci.sums
    cfg = ck.config
    for i in range(cfg.num_hidden_layers):
        c = ci.counts[f"blk.{i}.ffn_gate_up_exps.weight"]
        assert len(c) == cfg.num_experts and sum(c) == ids.numel() * cfg.top_k_experts
        assert c == ci.counts[f"blk.{i}.ffn_down_exps.weight"]
        assert ci.sums[f"blk.{i}.ffn_gate_up_exps.weight"].shape == (cfg.num_experts, cfg.hidden_size)
        assert ci.sums[f"blk.{i}.ffn_down_exps.weight"].shape == (cfg.num_experts, cfg.moe_intermediate_size)
        assert ci.counts[f"blk.{i}.ffn_gate_inp.weight"] == ids.numel()
    assert ci.chunks == 4 and "experts saw" in ci.expert_report()


def test_zero_count_expert_reads_back_as_ones_and_is_reported(tmp_path):
    """llama-quantize gives an expert that saw no token importance 1.0 in every column (a zero count
    in the file); so do we, whether the matrix is used directly or written and read back."""
    sums = {"blk.0.ffn_down_exps.weight": torch.tensor([[4.0, 8.0], [0.0, 0.0], [3.0, 6.0]]),
            "blk.0.ffn_gate_up_exps.weight": torch.tensor([[2.0, 2.0], [0.0, 0.0], [9.0, 3.0]]),
            "blk.0.ffn_up.weight": torch.tensor([10.0, 20.0])}
    counts = {"blk.0.ffn_down_exps.weight": [2, 0, 3], "blk.0.ffn_gate_up_exps.weight": [2, 0, 3],
              "blk.0.ffn_up.weight": 5}
    ci = ComputedImatrix(sums, counts, "t", 1, 5)
    imp = ci.to_imatrix().importance
    assert imp["blk.0.ffn_down_exps.weight"].tolist() == [2.0, 4.0, 1.0, 1.0, 1.0, 2.0]
    assert imp["blk.0.ffn_up.weight"].tolist() == [2.0, 4.0]
    ci.save(tmp_path / "im.gguf")
    back = read_imatrix(tmp_path / "im.gguf")
    for n, v in imp.items():
        assert torch.equal(back.importance[n], v)
    assert back.expert_counts == {"blk.0.ffn_down_exps.weight": [2, 0, 3], "blk.0.ffn_gate_up_exps.weight": [2, 0, 3]}
    rep = ci.expert_report()
    assert "1 of 3 experts saw no token (layer:expert 0:1)" in rep and "1.0" in rep


@pytest.mark.subprocess
def test_quantize_imatrix_on_moe_reports_the_experts(tmp_path, capsys):
    """`quantize --imatrix` end to end on the MoE layout: the importance matrix is computed, the
    experts' token counts reported, and the file records the imatrix as llama-quantize does."""
    import gguf

    from tests.reliability import run_cli

    pytest.importorskip("transformers")
    make_tiny_gemma4("moe", tmp_path / "moe", dtype=torch.bfloat16)
    text = tmp_path / "c.txt"
    text.write_text(" ".join("abcdefghij"[i % 10] * (1 + i % 5) for i in range(3000)))
    out = tmp_path / "m.gguf"
    res = run_cli(["quantize", tmp_path / "moe", "--scheme", "iq2_xxs", "--imatrix", "--calib", text,
                   "--calib-samples", "4", "--calib-len", "32", "-o", out], capsys)
    assert res.code == 0, res.stderr
    assert "experts saw" in " ".join(res.stdout.split())
    r = gguf.GGUFReader(out)
    assert r.fields["quantize.imatrix.entries_count"].contents() == 38
