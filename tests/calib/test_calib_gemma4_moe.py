"""Calibrated compressed-tensors schemes on a Gemma 4 mixture of experts and on the multimodal wrapper
(Gemma4ForConditionalGeneration), against transformers' own model of tiny checkpoints it saved:
  * the tokens each expert is calibrated on are the ones transformers' router sends it (counted from a
    hook on its router), and the fp8 input scales are absmax/448 of transformers' expert inputs;
  * an expert that no token reaches gets the data-free fallback, and a warning names it;
  * SmoothQuant's expert folds (shared into pre_feedforward_layernorm_2, per expert into up rows) keep
    the float model, in our forward and in transformers';
  * GPTQ on the experts beats round-to-nearest (in-sample KL to the float model);
  * the outputs load in transformers + compressed-tensors and in our `eval`, close to the bf16 model."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from gemmaquant.calib import CalibResult, calibrate
from gemmaquant.calib.experts import GATE_UP, NORM, smooth_experts
from gemmaquant.calib.runner import run_layers
from gemmaquant.calib.smoothquant import smooth_layer
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.model.loading import load_model
from gemmaquant.numerics.ct.grid import rtn
from gemmaquant.schemes import QuantArgs, get_scheme

from tests.tiny_gemma4 import WRAPPED, make_tiny_gemma4, per_expert_conversion

pytest.importorskip("transformers")
# slow tier throughout: every test builds transformers' tiny models (seconds of import and init each)
pytestmark = [pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning"), pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("g4moe"), {}

    def get(variant: str):
        if variant not in made:
            d = root / variant
            made[variant] = (d, make_tiny_gemma4(variant, d, dtype=torch.bfloat16))
        return made[variant]
    return get


def _ids(n: int, seq: int, seed: int) -> torch.Tensor:
    ids = torch.randint(5, 260, (n, seq), generator=torch.Generator().manual_seed(seed))  # no media ids
    ids[:, 0] = 2
    return ids


def _routing(hf, ids) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (expert input [N, H], top-k expert ids [N, k], each token's margin between its k-th and
    (k+1)-th router probability [N])} as transformers' model routes `ids`."""
    text = hf.model.language_model if hasattr(hf.model, "language_model") else hf.model
    seen, margin, handles = {}, {}, []
    for i, layer in enumerate(text.layers):
        k = layer.router.config.top_k_experts
        handles.append(layer.experts.register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(i, (args[0].detach().clone(), args[1].detach().clone()))))
        handles.append(layer.router.register_forward_hook(lambda _m, _a, out, i=i, k=k: margin.__setitem__(
            i, (lambda p: p[:, k - 1] - p[:, k])(out[0].sort(-1, descending=True).values))))
    try:
        with torch.no_grad():
            hf(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: (*seen[i], margin[i]) for i in seen}


@pytest.mark.parametrize("variant", ["moe", pytest.param("moe-mm", marks=pytest.mark.slow)])
def test_token_counts_and_fp8_scales_follow_transformers_router(tiny, variant):
    src, hf = tiny(variant)
    ck = Checkpoint(src)
    ids = _ids(3, 24, 4)  # no near-tie in the router's top k (72 tokens: margins from 1e-5; seed 1 has 7e-9)
    res = calibrate(ck, "fp8-static", ids=ids)
    routed = _routing(hf, ids)
    text = hf.model.language_model if variant in WRAPPED else hf.model
    cfg = ck.config
    assert sorted(res.expert_tokens.counts) == list(range(cfg.num_hidden_layers))
    for i, (x, idx, margin) in routed.items():
        want = torch.bincount(idx.reshape(-1), minlength=cfg.num_experts).tolist()
        # a token whose k-th and (k+1)-th probabilities tie within float32 rounding may go either way
        ties = int((margin < 1e-6).sum())
        assert sum(abs(a - b) for a, b in zip(res.expert_tokens.counts[i], want)) <= 2 * ties, i
        ex = text.layers[i].experts
        for e in range(cfg.num_experts):
            tok = (idx == e).any(-1)
            if not tok.any():  # the fallback: test_experts_without_tokens_fall_back_and_are_named
                continue
            xe = x[tok]
            gate, up = F.linear(xe, ex.gate_up_proj[e]).chunk(2, dim=-1)
            h = ex.act_fn(gate) * up
            p = f"model.layers.{i}.experts.{e}."
            assert res.input_scales[p + "gate_proj"] == res.input_scales[p + "up_proj"]  # vLLM's loader demands it
            assert res.input_scales[p + "gate_proj"] == pytest.approx(xe.abs().max().item() / 448, rel=1e-3)
            assert res.input_scales[p + "down_proj"] == pytest.approx(h.abs().max().item() / 448, rel=1e-3)
    seen = sum(n > 0 for c in res.expert_tokens.counts.values() for n in c)
    assert f"MoE experts: {seen} of 64 saw calibration tokens" in res.notes and seen >= 60


@pytest.mark.parametrize("scheme,algorithm", [("fp8-static", None),
                                              pytest.param("int8", "smoothquant", marks=pytest.mark.slow),
                                              pytest.param("w4a16", "gptq", marks=pytest.mark.slow)])
def test_experts_without_tokens_fall_back_and_are_named(tiny, caplog, scheme, algorithm):
    """Two tokens reach at most 8 of 16 experts per layer: the others get the layer's largest input
    scale (fp8-static) and round-to-nearest weights, and one warning line names them."""
    src, hf = tiny("moe")
    ck = Checkpoint(src)
    ids = _ids(1, 2, 3)
    sch = get_scheme(scheme)
    if scheme == "w4a16":  # tiny widths: group 16 (the writer's Marlin check is not involved here)
        sch = dataclasses.replace(sch, weights=QuantArgs(4, "int", "group", group_size=16))
    with caplog.at_level(logging.WARNING, logger="gemmaquant"):
        res = calibrate(ck, sch, algorithm=algorithm, ids=ids)
    unseen = res.expert_tokens.unseen()
    routed = _routing(hf, ids)
    assert all(float(routed[i][2].min()) > 1e-6 for i in routed)  # no near-tie: the same experts must be seen
    want = [(i, e) for i in sorted(routed) for e in range(16) if not (routed[i][1] == e).any()]
    assert unseen == want and len(unseen) >= 4 * 8
    warnings = [r.getMessage() for r in caplog.records if "saw no calibration token" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"{len(unseen)} MoE experts saw no calibration token (layer {unseen[0][0]} "
                                  f"expert {unseen[0][1]},")
    assert ("input scales" in warnings[0]) == (scheme == "fp8-static")
    assert ("round-to-nearest" in warnings[0]) == (algorithm is not None)
    for i, e in unseen:
        p = f"model.layers.{i}.experts."
        if scheme == "fp8-static":
            seen = [res.input_scales[f"{p}{x}.gate_proj"] for x in range(16) if (i, x) not in unseen]
            assert res.input_scales[f"{p}{e}.gate_proj"] == max(seen)
            assert res.input_scales[f"{p}{e}.up_proj"] == max(seen)
        elif algorithm == "gptq":  # the source weight rounded to nearest (nothing folded)
            w = ck.tensor(f"model.layers.{i}.experts.down_proj")[e].float()
            q = res.quantized[f"{p}{e}.down_proj"]
            assert torch.equal(q.codes, rtn(w, 4, 16, True).codes)
        else:  # every expert is written, the unseen ones from their folded (gate/up columns) weights
            assert f"{p}{e}.gate_proj" in res.quantized and f"{p}{e}.down_proj" in res.quantized
    assert "MoE experts: " in res.notes and f"layer {unseen[0][0]} expert {unseen[0][1]}" in res.notes


@pytest.mark.slow
def test_smoothquant_expert_folds_keep_float_logits(tiny):
    src, hf = tiny("moe")
    ck = Checkpoint(src)
    ids = _ids(3, 20, 0)
    model = load_model(ck, torch.float32)
    with torch.no_grad():
        before = model(ids)
    state, norms = {}, {}

    def on_layer(i, layer, stats):
        p = f"model.layers.{i}."
        local = {k[len(p):]: v for k, v in stats.items()}
        norms.update({p + a + ".weight": w for a, w in smooth_layer(layer, local, alpha=0.8,
                                                                    stored_dtype=torch.bfloat16).items()})
        moe = (stats[p + GATE_UP], stats[p + "experts.down_proj"])
        norms.update({p + a + ".weight": w for a, w in smooth_experts(
            layer, *moe, alpha=0.8, mappings=("gate_up", "down"), stored_dtype=torch.bfloat16).items()})
        state.update({p + k: v.clone() for k, v in layer.state_dict().items()})

    run_layers(ck, ids, kinds={"absmax"}, on_layer=on_layer, sequential=False, batch_size=2)
    n = ck.config.num_hidden_layers
    assert {f"model.layers.{i}.{NORM}.weight" for i in range(n)} <= set(norms)
    for i in range(n):  # the experts' columns and up rows moved; the router did not
        p = f"model.layers.{i}."
        assert not torch.equal(state[p + "experts.gate_up_proj"], ck.tensor(p + "experts.gate_up_proj").float())
        assert not torch.equal(state[p + "experts.down_proj"], ck.tensor(p + "experts.down_proj").float())
        assert torch.equal(state[p + "router.proj.weight"], ck.tensor(p + "router.proj.weight").float())
    model.load_state_dict(state, strict=False)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    with torch.no_grad():
        assert rel(model(ids), before) < 1e-5
        ref_before = hf(input_ids=ids, use_cache=False).logits
        _, unexpected = hf.load_state_dict(state, strict=False)
        assert not unexpected
        after = hf(input_ids=ids, use_cache=False).logits
    hf.load_state_dict({k: ck.tensor(k).float() for k in state}, strict=False)  # the fixture's model, restored
    assert rel(after, ref_before) < 1e-5


def _kl(ref_logits, logits):
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True,
                    reduction="batchmean").item()


def moe_state(ck: Checkpoint, res: CalibResult) -> dict[str, torch.Tensor]:
    """Our model's state dict from a calibration result: per-expert Linears back into the fused tensors."""
    cfg = ck.config
    sd = {n: t.float() for n, t in res.overrides.items()}
    fused = {}
    ie = cfg.moe_intermediate_size
    rows = {"gate_proj": slice(0, ie), "up_proj": slice(ie, 2 * ie), "down_proj": slice(None)}
    for name, q in res.quantized.items():
        if ".experts." not in name:
            sd[name + ".weight"] = q.dequantize()
            continue
        p, e, proj = name.rsplit(".", 2)
        key = p + (".gate_up_proj" if proj != "down_proj" else ".down_proj")
        e = int(e)
        if key not in fused:
            fused[key] = ck.tensor(key).float().clone()
        fused[key][e, rows[proj]] = q.dequantize()
    return {**sd, **fused}


@pytest.mark.slow
def test_gptq_on_experts_beats_rtn(tiny):
    """In-sample KL to the float model of W4 (group 16) weights: GPTQ and AWQ (per-expert Hessians from
    the routed tokens) against round-to-nearest of every Linear and expert."""
    src, _ = tiny("moe")
    ck = Checkpoint(src)
    cfg = ck.config
    scheme = dataclasses.replace(get_scheme("w4a16"), weights=QuantArgs(4, "int", "group", group_size=16))
    ids = _ids(16, 32, 0)
    test_ids = ids[:6]
    with torch.no_grad():
        ref = load_model(ck)(test_ids)

    def kl_of(res):
        m = load_model(ck)
        _, unexpected = m.load_state_dict(moe_state(ck, res), strict=False)
        assert not unexpected
        with torch.no_grad():
            return _kl(ref, m(test_ids))

    rtn_res = CalibResult()
    for i in range(cfg.num_hidden_layers):
        for s in cfg.linear_shapes(i):
            n = f"model.layers.{i}.{s}"
            rtn_res.quantized[n] = rtn(ck.tensor(n + ".weight").float(), 4, 16, True)
        for s, (fused, rows, _) in cfg.expert_linears(i).items():
            e = int(s.split(".")[1])
            rtn_res.quantized[f"model.layers.{i}.{s}"] = rtn(ck.tensor(f"model.layers.{i}.{fused}")[e, rows].float(),
                                                             4, 16, True)
    gptq = calibrate(ck, scheme, algorithm="gptq", ids=ids)
    assert sorted(gptq.quantized) == sorted(rtn_res.quantized)
    kl_rtn, kl_gptq = kl_of(rtn_res), kl_of(gptq)
    kl_awq = kl_of(calibrate(ck, scheme, algorithm="awq", ids=ids, awq_grid=5))
    assert kl_gptq < 0.7 * kl_rtn and kl_awq < 1.05 * kl_rtn, (kl_rtn, kl_gptq, kl_awq)


# (scheme, algorithm, variant): weight-only W4 needs the 256-wide MoE (vLLM's Marlin MoE shape rules)
CASES = [("fp8-static", None, "moe"), ("int8", "smoothquant", "moe"), ("w4a16", "gptq", "moe-256-small"),
         ("w4a16", "awq", "moe-256-small"), ("fp8-static", None, "moe-mm"), ("int8", "smoothquant", "e2b-mm"),
         ("fp8-static", None, "e2b-mm"), ("w4a16", "gptq", "e2b-256-mm")]
# The format's round-to-nearest counterpart (dynamic activations for fp8-static), written beside it: tiny
# random Gemma 4 models (attention scaling 1.0, sharp attention) move tens of percent under any 8- or 4-bit
# format (relative logits error to the bf16 model, RTN: fp8 0.20-0.40, int8 0.05-0.21, w4a16 0.35-0.5), so
# "close" is: within 1.3x of what round-to-nearest of the same format does, and below 1.
RTN_OF = {"fp8-static": "fp8", "int8": "int8", "w4a16": "w4a16"}


def _check_input_scales(out, cfg) -> None:
    """Every quantized Linear and expert has a positive [1] fp8 scale; an expert's gate and up scales are
    equal (vLLM's fused-MoE loader raises on unequal w1/w3 input scales)."""
    from gemmaquant.formats.safetensors import SafetensorsFile

    f = SafetensorsFile(out / "model.safetensors")
    scales = {n: f.get(n).float() for n in f.keys() if n.endswith(".input_scale")}
    f.close()
    assert scales and all(t.shape == (1,) and float(t) > 0 for t in scales.values())
    for n, t in scales.items():
        if n.endswith("experts.0.gate_proj.input_scale"):
            for e in range(cfg.num_experts):
                g = n.replace("experts.0.gate_proj", f"experts.{e}.gate_proj")
                assert torch.equal(scales[g], scales[g.replace("gate_proj", "up_proj")])
                assert g.replace("gate_proj", "down_proj") in scales
    assert sum(".experts." in n for n in scales) == 3 * cfg.num_experts * cfg.num_hidden_layers * cfg.is_moe


@pytest.mark.slow
@pytest.mark.parametrize("scheme,algorithm,variant", CASES, ids=[f"{s}-{a}-{v}" for s, a, v in CASES])
def test_calibrated_outputs_load_in_transformers_and_eval(tiny, tmp_path, scheme, algorithm, variant):
    import transformers

    from gemmaquant.evaluate.artifact import open_artifact
    from gemmaquant.pipeline import QuantizeOptions, run_quantize

    src, hf_src = tiny(variant)
    out = tmp_path / "out"
    text = tmp_path / "calib.txt"
    text.write_text(" ".join("abcdef"[i % 6] * (1 + i % 5) for i in range(4000)))
    summary = run_quantize(Checkpoint(src), get_scheme(scheme), out,
                           QuantizeOptions(algorithm=algorithm, calib=text, calib_samples=8, calib_len=64))
    moe, mm = "moe" in variant, variant in WRAPPED
    assert any(n.startswith("calibrated") for n in summary.notes)
    assert any(n.startswith("MoE experts: ") for n in " ; ".join(summary.notes).split("; ")) == moe
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert ("re:.*vision_tower.*" in qc["ignore"]) == mm
    card = (out / "README.md").read_text()
    assert ("MoE experts: " in card) == moe

    run_quantize(Checkpoint(src), get_scheme(RTN_OF[scheme]), tmp_path / "rtn", QuantizeOptions(algorithm="rtn"))
    ids = _ids(2, 24, 7)
    with torch.no_grad():
        ref = hf_src(input_ids=ids, use_cache=False).logits
        ours = open_artifact(str(out), torch.float32).model(ids)
        plain = open_artifact(str(tmp_path / "rtn"), torch.float32).model(ids)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    bound = min(1.0, 1.3 * rel(plain, ref))
    assert rel(ours, ref) < bound, (rel(ours, ref), rel(plain, ref))

    sch = get_scheme(scheme)
    int_experts = moe and sch.ct_format == "int-quantized"  # transformers 5.23 does not dequantize these
    cls = transformers.AutoModelForImageTextToText if mm else transformers.AutoModelForCausalLM
    if int_experts:
        return
    with per_expert_conversion():
        hf, info = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                       experts_implementation="eager", output_loading_info=True,
                                       quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    static = sch.input_activations is not None and not sch.input_activations.dynamic
    if static:  # dequantize=True runs the weights in float and drops the activation scales, nothing else
        assert info["unexpected_keys"] and all(k.endswith(".input_scale") for k in info["unexpected_keys"])
        assert not info["missing_keys"] and not info["mismatched_keys"]
        _check_input_scales(out, Checkpoint(src).config)
    else:
        assert not any(info.values()), info
    hf = hf.float()
    with torch.no_grad():
        theirs = hf(input_ids=ids, use_cache=False).logits
    assert rel(theirs, ref) < bound, (rel(theirs, ref), rel(plain, ref))
    if sch.input_activations is None:  # weight-only: both run the same dequantized weights
        assert rel(ours, theirs) < 1e-5


@pytest.mark.slow
def test_cli_reports_expert_tokens_and_names_the_unseen(tiny, tmp_path, capsys, monkeypatch):
    """`quantize` on the MoE with a short calibration text: the summary's counts line, a note naming the
    experts no token reached, and every count in the model card (each layer routes tokens × top-k)."""
    import re

    from tests.reliability import run_cli

    monkeypatch.setenv("COLUMNS", "400")
    src, _ = tiny("moe")
    text = tmp_path / "c.txt"
    text.write_text("abc bad cab dead bead face " * 20)
    out = tmp_path / "out"
    r = run_cli(["quantize", src, "--scheme", "fp8-static", "-o", out, "--calib", text, "--calib-samples", "1",
                 "--calib-len", "8"], capsys)
    assert r.code == 0, r.stderr
    m = re.search(r"MoE experts: (\d+) of 64 saw calibration tokens", r.stdout + r.stderr)
    assert m and int(m.group(1)) < 64
    note = re.search(r"note: (\d+) MoE experts saw no calibration token \(layer \d+ expert \d+", r.stderr)
    assert note and int(note.group(1)) + int(m.group(1)) == 64
    card = (out / "README.md").read_text()
    rows = re.search(r"Calibration tokens routed to each MoE expert[^:]*: (.*)", card).group(1).split(" | ")
    assert [r.split(":")[0] for r in rows] == [f"layer {i}" for i in range(4)]
    counts = [[int(x) for x in r.split(":")[1].split()] for r in rows]
    assert all(len(c) == 16 and sum(c) == 8 * 4 for c in counts)  # 8 tokens, each to its top 4
    assert sum(n == 0 for c in counts for n in c) == int(note.group(1))
