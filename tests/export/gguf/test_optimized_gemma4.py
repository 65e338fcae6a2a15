"""Size budgets (`--target-size`, `--target-bpw`) on every Gemma 4 layout (export/gguf/optimized.py, with
calib/sensitivity.py measuring the tensors): 31B-like (attention_k_eq_v), the same without k_eq_v, E2B-like
(per-layer inputs + KV sharing), the MoE and the multimodal wrapper, tiny checkpoints saved by transformers.

References: llama.cpp (llama-cpp-python) loads each file, gives finite logits and counts its BPW; gguf-py's
reader gives the layout and keys; our full forward pass (equal to transformers' logits, tests/model/
test_gemma4.py) gives the true KL of quantizing one tensor, which the sensitivity streams of the KV
producers and of the per-layer input table must reproduce exactly."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from gemmaquant.calib.budget import tensor_bytes
from gemmaquant.export.gguf.optimized import KEY_PLAN, KEY_TARGET
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.numerics.ggml.types import GGMLType
from tests.reliability import check_error, run_cli
from tests.tiny_gemma4 import make_tiny_gemma4

from .test_optimized import CALIB, kv_value, layout_of, quantize_json

T = GGMLType
pytestmark = pytest.mark.slow
# layout -> tensors the budget must have chosen a type for (what is new in it)
LAYOUTS = {
    "dense": ("blk.2.attn_k.weight",),  # 31B-like: full layers take V from k_proj (no attn_v)
    "dense-kv": ("blk.2.attn_v.weight",),
    "e2b-p32": ("per_layer_token_embd.weight", "blk.0.inp_gate.weight", "blk.0.proj.weight"),
    "moe": ("blk.0.ffn_gate_up_exps.weight", "blk.0.ffn_down_exps.weight"),
    "e2b-mm": ("blk.0.inp_gate.weight",),  # Gemma4ForConditionalGeneration: the text model's tensors only
}
NEVER = ("ffn_gate_inp.weight", "per_layer_model_proj.weight")  # llama-quantize never quantizes them


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("g4budget")
    for k in LAYOUTS:
        make_tiny_gemma4(k, root / k, dtype=torch.bfloat16)
    return root


def _llama(path):
    """llama.cpp's (model size, parameters) and finite logits on a few tokens."""
    import llama_cpp

    from tests.llamacpp import open_llama

    llm = open_llama(path, n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    toks = [2, 17, 99, 250, 4, 31]
    llm.eval(toks)
    assert np.isfinite(np.asarray(llm.scores[: len(toks)])).all()
    return llama_cpp.llama_model_size(llm.model), llama_cpp.llama_model_n_params(llm.model)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", LAYOUTS)
def test_target_size_met_planned_recorded_loads_and_reruns_identically(tiny, tmp_path, capsys, kind):
    src = tiny / kind
    plain = quantize_json(src, tmp_path / "plain.gguf", capsys)
    target = plain["output_bytes"] * 92 // 100
    out = tmp_path / "budget.gguf"
    dry = run_cli(["quantize", src, "--scheme", "q4_k_m", "-o", out, "--dry-run", "--json", "--threads", 1,
                   "--all", *CALIB, "--target-size", target], capsys)
    assert dry.code == 0, dry.stderr
    rows = json.loads(dry.stdout)["tensors"]
    planned = {r["tensor"]: r["type"] for r in rows}
    assert all(r["note"].startswith("budget:") for r in rows if r["tensor"] in LAYOUTS[kind])  # the why
    s = quantize_json(src, out, capsys, "--target-size", target, "--card")
    assert out.stat().st_size == s["output_bytes"] <= target
    r, layout = layout_of(out)
    got = {n: T(v[0]).name for n, v in layout.items()}
    assert got == planned  # the dry run's plan is the file's
    plan = dict(e.split("=") for e in kv_value(r, KEY_PLAN))
    assert all(n in plan for n in LAYOUTS[kind]) and not any(n.endswith(NEVER) for n in plan)
    assert plan == {n: t for n, t in got.items() if n in plan}
    assert len(set(plan.values())) > 1  # a real mix
    assert str(target) in kv_value(r, KEY_TARGET).replace(",", "")
    card = (tmp_path / "README.md").read_text()
    assert "size budget --target-size" in card and all(n.removesuffix(".weight") in card for n in LAYOUTS[kind])
    if kind.endswith("-mm"):  # the towers went to the mmproj beside it, not into the budget
        assert not any(n.startswith(("v.", "a.", "mm.")) for n in layout)
    _llama(out)
    again = tmp_path / "again.gguf"
    quantize_json(src, again, capsys, "--target-size", target, threads=2)
    assert _sha(again) == _sha(out)


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", LAYOUTS)
def test_target_bpw_as_llama_cpp_counts_it(tiny, tmp_path, capsys, kind):
    src = tiny / kind
    plain = tmp_path / "plain.gguf"
    quantize_json(src, plain, capsys)
    size, n = _llama(plain)
    bpw = round(0.93 * 8 * size / n, 2)
    out = tmp_path / "bpw.gguf"
    quantize_json(src, out, capsys, "--target-bpw", bpw)
    size, n = _llama(out)
    assert 8 * size / n <= bpw
    _, layout = layout_of(out)
    data = sum(tensor_bytes(v[1][::-1], T(v[0])) for v in layout.values())
    # llama.cpp's count: every tensor's parameters, its data without the alignment padding we budget for
    assert n == sum(int(np.prod(v[1])) for v in layout.values())
    assert data - 32 * len(layout) < size <= data


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["moe", "e2b-p32"])
def test_gptq_codes_within_a_budget(tiny, tmp_path, capsys, kind):
    """--algorithm gptq with a budget: error-feedback codes for the attention and MLP Linears (the experts
    and per-layer input tensors keep llama.cpp's rounding of their chosen types)."""
    src = tiny / kind
    plain = quantize_json(src, tmp_path / "plain.gguf", capsys)
    target = plain["output_bytes"] * 92 // 100
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    s = quantize_json(src, a, capsys, "--algorithm", "gptq", "--target-size", target)
    assert a.stat().st_size == s["output_bytes"] <= target
    assert any("error feedback" in x for x in s["notes"])
    _llama(a)
    quantize_json(src, b, capsys, "--algorithm", "gptq", "--target-size", target, threads=2)
    assert _sha(a) == _sha(b)


def test_smallest_size_named_in_the_error_is_reachable(tiny, tmp_path, capsys):
    src = tiny / "moe"
    res = run_cli(["quantize", src, "--scheme", "q4_k_m", "-o", tmp_path / "x.gguf", *CALIB,
                   "--target-size", "10kB"], capsys)
    line = check_error(res, 2, "below the smallest file these tensors allow (")
    smallest = int(line.split("allow (")[1].split(" bytes")[0].replace(",", ""))
    assert not (tmp_path / "x.gguf").exists()
    res = run_cli(["quantize", src, "--scheme", "q4_k_m", "-o", tmp_path / "x.gguf", *CALIB,
                   "--target-size", smallest - 1], capsys)
    check_error(res, 2, f"({smallest:,} bytes")
    s = quantize_json(src, tmp_path / "y.gguf", capsys, "--target-size", smallest)
    assert s["output_bytes"] <= smallest
    res = run_cli(["quantize", src, "--scheme", "q4_k_m", "-o", tmp_path / "z.gguf", *CALIB,
                   "--target-bpw", "1.5"], capsys)
    check_error(res, 2, "below the smallest size these tensors allow")


# ---- the sensitivity pass itself, against our full forward pass ----

def true_kl(model, ids, param, value, positions):
    with torch.no_grad():
        ref = model(ids)[:, -positions:].double().log_softmax(-1)
        W = param.detach().clone()
        param.copy_(value)
        q = model(ids)[:, -positions:].double().log_softmax(-1)
        param.copy_(W)
    return float((ref.exp() * (ref - q)).sum(-1).mean())


def float_inputs(model, ids):
    """Each Linear's float input [tokens, in], and each MoE layer's routed expert inputs."""
    inputs, routed, hooks = {}, {}, []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_pre_hook(
                lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    for i, layer in enumerate(model.layers):
        if hasattr(layer, "experts"):
            layer.experts.observer = lambda e, w, x, i=i: routed.setdefault((i, w), {}).setdefault(e, []).append(x)
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for layer in model.layers:
        if hasattr(layer, "experts"):
            layer.experts.observer = None
    return {k: torch.cat(v) for k, v in inputs.items()}, routed


def at_reference(model, name, inputs, routed):
    """(parameter, its value at the reference type) as the sensitivity pass quantizes it."""
    from gemmaquant.calib.ggml_calibrate import imatrix_of
    from gemmaquant.calib.sensitivity import REFERENCE
    from gemmaquant.calib.sensitivity_parts import expert_imatrix, quantized
    from gemmaquant.formats.gguf.names import hf_name

    hf = hf_name(name, 4)
    p = dict(model.named_parameters())[hf]
    W = p.detach().to(torch.bfloat16).float()
    if "experts" in hf:
        i, which = int(hf.split(".")[2]), "gate_up" if "gate_up" in hf else "down"
        got = routed[(i, which)]
        X = [torch.cat(got[e]) if e in got else None for e in range(W.shape[0])]
        imat = expert_imatrix(X)
        out = W.clone()
        for e in range(W.shape[0]):
            out[e] = quantized(W[e], REFERENCE, imat[e])
        return p, out
    if not hf.startswith("model.layers."):  # the per-layer table: llama-imatrix has no entry for it
        return p, quantized(W, REFERENCE, None)
    key = hf.removesuffix(".weight")
    for sibling, src in (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj")):
        key = key[: -len(sibling)] + src if key.endswith(sibling) else key
    x = inputs[key].double()
    return p, quantized(W, REFERENCE, imatrix_of(x.pow(2).sum(0), x.shape[0]))


@pytest.fixture(scope="module")
def float_tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("g4sens")
    for k in ("e2b-p32", "moe"):
        make_tiny_gemma4(k, root / k)
    return root


def _measure(d):
    from gemmaquant.calib.sensitivity import measure_sensitivity
    from gemmaquant.model.loading import load_model

    ck = Checkpoint(d)
    ids = torch.randint(5, 260, (3, 24), generator=torch.Generator().manual_seed(0))
    # the weights' part alone: the true KL below is our forward pass's, which keeps float activations
    # (llama.cpp's 8-bit rounding of them, the other part, is checked in tests/calib/test_sensitivity.py)
    rep = measure_sensitivity(ck, ids, kl_positions=8, batch_size=2, activations=False)
    model = load_model(ck)
    return ck, ids, rep, model


def test_kv_producers_and_the_per_layer_table_are_measured_exactly(float_tiny):
    """Their own streams carry exactly that one perturbation to the logits: at the reference type the
    estimate IS the KL of the model with that tensor quantized (the shared K/V reach the KV-shared layers),
    up to float32 summation order (the layer-gain estimates of the other tensors are off by 10-60 %)."""
    from gemmaquant.calib.sensitivity import BUDGET_TYPES, REFERENCE, choosable
    from gemmaquant.export.gguf.plan import plan_types

    ck, ids, rep, model = _measure(float_tiny / "e2b-p32")
    plans = plan_types(ck.config, "q4_k_m", True)
    assert set(rep.tensors) == {p.name for p in plans if choosable(p.name, p.shape, BUDGET_TYPES)}
    first = ck.config.first_kv_shared
    assert not any(f"blk.{i}.attn_k." in n for n in rep.tensors for i in range(first, ck.config.num_hidden_layers))
    inputs, routed = float_inputs(model, ids)
    exact = [n for n, s in rep.tensors.items() if "own gain" in s.detail or "per-layer input" in s.detail]
    assert sorted(exact) == sorted(["blk.1.attn_k.weight", "blk.1.attn_v.weight", "blk.2.attn_k.weight",
                                    "blk.2.attn_v.weight", "per_layer_token_embd.weight"])
    for name in exact:
        p, value = at_reference(model, name, inputs, routed)
        assert rep.tensors[name].kl[REFERENCE] == pytest.approx(true_kl(model, ids, p, value, 8), rel=1e-5), name


def test_moe_estimates_rank_the_tensors_as_the_true_kl(float_tiny):
    """Every estimate (fused experts through the router's real routing included) against the true KL of
    quantizing that tensor alone: the same order of magnitude, and ranked alike."""
    from gemmaquant.calib.sensitivity import REFERENCE

    _, ids, rep, model = _measure(float_tiny / "moe")
    inputs, routed = float_inputs(model, ids)
    est, true = [], []
    for name, s in rep.tensors.items():
        if not name.startswith("blk."):
            continue
        p, value = at_reference(model, name, inputs, routed)
        est.append(s.kl[REFERENCE])
        true.append(true_kl(model, ids, p, value, 8))
    est, true = np.array(est), np.array(true)
    assert np.all((est > true / 10) & (est < true * 10)), np.stack([est, true])
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(est), rank(true))[0, 1] > 0.6
