"""compressed-tensors outputs of Gemma 4 mixtures of experts and of the multimodal wrapper
(Gemma4ForConditionalGeneration), round-to-nearest schemes, from tiny checkpoints saved by transformers.

transformers cannot read per-expert Linears by itself (it keeps Gemma 4's experts fused): the tests load
the outputs with the conversion mapping of `tests.tiny_gemma4.per_expert_conversion`
and compressed-tensors' own dequantization (`dequantize=True`), and compare weights: on random tiny Gemma 4
models (attention scaling 1.0) FP8 rounding alone moves logits by tens of percent, so logits are compared
only where both sides run the same dequantized weights (weight-only schemes)."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch

from gemmaquant.calib import calibrate
from gemmaquant.errors import GemmaQuantError
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.formats.safetensors import SafetensorsFile
from gemmaquant.pipeline import QuantizeOptions, ct_plan, run_quantize
from gemmaquant.schemes import get_scheme
from tests.tiny_gemma4 import WRAPPED, make_tiny_gemma4, per_expert_conversion

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
# ||deq - w|| / ||w|| of one expert's Linear, at most (RTN on N(0, 0.08) weights; measured 0.02-0.11)
FORMAT_ERROR = {"fp8": 0.05, "int8": 0.01, "int8-w8a16": 0.01, "w4a16": 0.15, "w4a16-asym": 0.15}
BF16_ULP = 2.0 ** -8  # transformers' dequantized weights are rounded to the checkpoint dtype


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("g4ct"), {}

    def get(variant: str):
        if variant not in made:
            made[variant] = root / variant
            make_tiny_gemma4(variant, made[variant], dtype=torch.bfloat16)
        return made[variant]
    return get


def _stored(d) -> dict[str, tuple]:
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        f = SafetensorsFile(p)
        out.update({n: (f.dtype(n), f.shape(n), bytes(f.raw_bytes(n))) for n in f.keys()})
        f.close()
    return out


# what the gemma-4-26b-a4b-it-w4a16 recipe makes of w4a16: group 64, the dense down_proj left in bf16
DOWN = r"re:.*layers\.\d+\.mlp\.down_proj$"
RECIPE = {"w4a16-g64-ignore": ("w4a16", dict(group_size=64, ignore=[DOWN]))}
FORMAT_ERROR["w4a16-g64-ignore"] = FORMAT_ERROR["w4a16"]


def _scheme(name: str):
    base, custom = RECIPE.get(name, (name, {}))
    return get_scheme(base).customized(**custom) if custom else get_scheme(base)


def _quantize(src, scheme: str, out):
    return run_quantize(Checkpoint(src), _scheme(scheme), out, QuantizeOptions(algorithm="rtn"))


CASES = [("fp8", "moe"), ("fp8", "moe-mm"), ("fp8", "e2b-mm"), ("int8", "moe"), ("int8", "e2b-mm"),
         ("int8-w8a16", "moe-256"), ("w4a16", "moe-256-mm"), ("w4a16-asym", "moe-256"),
         ("w4a16-g64-ignore", "moe-256")]


@pytest.mark.slow
@pytest.mark.parametrize("scheme,variant", CASES, ids=[f"{s}-{v}" for s, v in CASES])
def test_transformers_loads_the_output_as_the_source_architecture(sources, tmp_path, scheme, variant):
    """(a) transformers + compressed-tensors load it as the source architecture with no missing or
    unexpected tensor, the experts and every other quantized Linear hold exactly our dequantized weights
    (up to the bf16 rounding of transformers' dequantization) within the format's error of the source,
    the towers are the source's bytes under the source's names; (b) weight-only: the same logits as our
    `eval` model; (c) `ignore` names exactly the Linears left unquantized."""
    import transformers
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.utils.match import match_named_modules

    from gemmaquant.evaluate.artifact import open_artifact
    from gemmaquant.evaluate.quantized import LinearExperts

    src, out = sources(variant), tmp_path / "out"
    summary = _quantize(src, scheme, out)
    mm, moe = variant in WRAPPED, variant.startswith("moe")
    cfg_src, cfg = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == cfg_src["architectures"] == [
        "Gemma4ForConditionalGeneration" if mm else "Gemma4ForCausalLM"]
    qc = cfg.pop("quantization_config")
    assert cfg == cfg_src
    ignore = ["lm_head"] + ([r"re:.*router\.proj$"] if moe else []) + \
        (["re:.*per_layer_model_projection$"] if variant.startswith("e2b") else []) + \
        (["re:.*vision_tower.*", "re:.*audio_tower.*", "re:.*embed_vision.*", "re:.*embed_audio.*"] if mm else []) + \
        list(_scheme(scheme).extra_ignore)
    assert qc["ignore"] == ignore
    if scheme in RECIPE:
        assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64

    got, want = _stored(out), _stored(src)
    text = "model.language_model." if mm else "model."
    media = {n for n in want if not n.startswith(text)}
    assert media == {n for n in got if not n.startswith(text)} and bool(media) == mm
    assert all(got[n] == want[n] for n in media)  # towers and embedders: the source's bytes and names
    for name in PROCESSOR_FILES if mm else ():
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not [n for n in got if re.search(r"experts\.(gate_up|down)_proj$", n)]
    leaf = "weight_packed" if _scheme(scheme).ct_format == "pack-quantized" else "weight"
    art = open_artifact(str(out), torch.float32)
    c = art.config
    if moe:
        experts = {n for n in got if ".experts." in n and n.endswith("." + leaf)}
        assert len(experts) == 3 * c.num_experts * c.num_hidden_layers
        assert f"{text}layers.3.experts.{c.num_experts - 1}.down_proj.{leaf}" in experts
        assert any("16 experts x 4 layers" in n for n in summary.notes)

    # experts: our dequantization == compressed-tensors' own decompression of the stored tensors
    scheme_ct = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    files = {p: SafetensorsFile(p) for p in out.glob("*.safetensors")}

    def ct_weight(module: str) -> torch.Tensor:
        sd = {n[len(module) + 1:]: f.get(n) for f in files.values() for n in f.keys() if n.startswith(module + ".")}
        return compressor.decompress(sd, scheme_ct)["weight"].float()

    cls = transformers.AutoModelForImageTextToText if mm else transformers.AutoModelForCausalLM
    ref = cls.from_pretrained(src, dtype=torch.float32).state_dict()
    # transformers 5.23 dequantizes fp8 and symmetric packed experts, not int-quantized or zero-point ones
    # (its CompressedTensorsDequantize): for those it loads everything else and leaves the experts unread
    sch = _scheme(scheme)
    int_experts = moe and (sch.ct_format == "int-quantized" or not sch.weights.symmetric)
    with per_expert_conversion() if not int_experts else contextlib.nullcontext():
        hf, info = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                       experts_implementation="eager", output_loading_info=True,
                                       quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    if int_experts:
        assert {k for k, v in info.items() if v} == {"missing_keys", "unexpected_keys"}
        assert all(".experts." in k for k in info["missing_keys"] | set(info["unexpected_keys"]))
    else:
        assert not any(info.values()), info
    hf = hf.float()  # transformers dequantizes packed experts into bf16 whatever `dtype` says
    theirs = hf.state_dict()

    def close(ours: torch.Tensor, reference: torch.Tensor, source: torch.Tensor, what: str) -> None:
        assert torch.allclose(ours.float(), reference, rtol=BF16_ULP, atol=1e-6), what
        assert float((reference - source).norm() / source.norm()) < FORMAT_ERROR[scheme], what

    quantized = set()
    for i, layer in enumerate(art.model.layers):
        p = f"{text}layers.{i}."
        for suffix in c.linear_shapes(i):
            if sch.extra_ignore and suffix == "mlp.down_proj":  # the recipe's ignore: the source's bytes
                assert got[p + suffix + ".weight"] == want[p + suffix + ".weight"]
                assert torch.equal(theirs[p + suffix + ".weight"], ref[p + suffix + ".weight"])
                continue
            close(layer.get_submodule(suffix).dequantize(), theirs[p + suffix + ".weight"], ref[p + suffix + ".weight"],
                  p + suffix)
            quantized.add(p + suffix)
        if not moe:
            continue
        ex = layer.experts
        assert isinstance(ex, LinearExperts)
        ie = c.moe_intermediate_size
        for e in range(c.num_experts):
            for j, (proj, fused, rows) in enumerate((("gate_proj", "gate_up_proj", slice(0, ie)),
                                                     ("up_proj", "gate_up_proj", slice(ie, 2 * ie)),
                                                     ("down_proj", "down_proj", slice(None)))):
                name = f"{p}experts.{e}.{proj}"
                ours = getattr(ex, proj)[e].dequantize()
                close(ours, ct_weight(name), ref[p + "experts." + fused][e][rows], name)
                if not int_experts:  # transformers merged them back into the fused layout
                    assert torch.allclose(ours.float(), theirs[p + "experts." + fused][e][rows].float(),
                                          rtol=BF16_ULP, atol=1e-6)
                quantized.add(name)
        assert torch.equal(theirs[p + "router.proj.weight"], ref[p + "router.proj.weight"])
    for f in files.values():
        f.close()
    assert {n.rsplit(".", 1)[0] for n in got if n.endswith(("." + leaf, ".weight_scale")) and got[n][0] in
            (torch.float8_e4m3fn, torch.int8, torch.int32)} == quantized

    # (c) compressed-tensors' own matcher over the source architecture: what `targets: Linear` minus
    # `ignore` selects is exactly what we quantized (experts are not Linears in transformers' tree)
    with torch.device("meta"):
        arch = type(hf)(hf.config)
    selected = {n for n, _ in match_named_modules(arch, ["Linear"], qc["ignore"])}
    assert selected == {q for q in quantized if ".experts." not in q}

    if leaf == "weight_packed" and not int_experts:  # (b) weight-only: both run the same dequantized weights
        ids = torch.randint(5, 300, (1, 16), generator=torch.Generator().manual_seed(0))
        ids[:, 0] = 2
        with torch.no_grad():
            a, b = art.model(ids), hf(input_ids=ids, use_cache=False).logits
        assert float((a - b).norm() / b.norm()) < 1e-5


@pytest.mark.slow
def test_eval_and_compare_read_the_moe_output(sources, tmp_path, capsys):
    from gemmaquant.evaluate.compare import compare_artifacts
    from tests.reliability import run_cli

    src, out = sources("moe"), tmp_path / "fp8"
    _quantize(src, "fp8", out)
    text = tmp_path / "t.txt"
    text.write_text("abc bad cab dead bead face " * 40)
    r = run_cli(["eval", out, "--text", text, "--ctx", 32, "--chunks", 2, "--json", "-", "-q"], capsys)
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout[r.stdout.index("{"):])["ppl"] > 1
    rep = compare_artifacts(str(src), [str(out)], text, ctx=32, chunks=2)
    assert rep is not None


def test_refusals_are_one_line(sources, tmp_path):
    """(d) weight-only experts vLLM's Marlin MoE kernel cannot run (hidden 64, experts 32 wide), and GPTQ's
    float target on a MoE (the float and quantized streams route tokens differently): one line, nothing
    written. (Calibrated schemes on the MoE: tests/calib/test_calib_gemma4_moe.py.)"""
    ck = Checkpoint(sources("moe"))
    for scheme in ("w4a16", "int8-w8a16", "w4a16-asym"):
        with pytest.raises(GemmaQuantError, match="Marlin MoE kernel .* hidden_size 64, moe_intermediate_size 32") as e:
            run_quantize(ck, get_scheme(scheme), tmp_path / scheme, QuantizeOptions(algorithm="rtn"))
        assert "\n" not in str(e.value) and not (tmp_path / scheme).exists()
    with pytest.raises(GemmaQuantError, match="float target is not supported on a mixture of experts") as e:
        calibrate(ck, "w4a16", algorithm="gptq", float_target=True, ids=torch.full((1, 4), 7))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_dry_run_plan_shows_the_experts_and_their_bytes(sources, tmp_path, scheme):
    from gemmaquant.export.compressed_tensors import write_compressed_tensors

    ck = Checkpoint(sources("moe"))
    rows = ct_plan(ck, get_scheme(scheme))
    ex = [r for r in rows if ".experts.*." in r["tensor"]]
    assert [r["tensor"] for r in ex[:3]] == [f"model.layers.0.experts.*.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert len(ex) == 3 * 4 and ex[2]["shape"] == [16, 64, 32] and ex[0]["note"].startswith("16 per-expert Linears")
    assert {r["note"] for r in rows if "router.proj" in r["tensor"]} == {
        "MoE router: unquantized (vLLM runs it in float32 without a quant method), in `ignore`"}
    rep = write_compressed_tensors(ck, get_scheme(scheme), tmp_path / "out", progress=False)
    assert sum(r["bytes"] for r in rows) == rep.tensor_bytes


def test_experts_are_quantized_one_at_a_time(sources, tmp_path, monkeypatch):
    """Streaming: the writer converts one expert's rows to float32 at a time, never a fused [E, 2I, H]
    tensor (a 26B-A4B layer's would be 128 × 1408 × 2816 floats, 2 GB)."""
    from gemmaquant.export import compressed_tensors as ct

    seen = []
    real = ct.quantize_for

    def spy(w, *args, **kwargs):
        seen.append(tuple(w.shape))
        return real(w, *args, **kwargs)

    monkeypatch.setattr(ct, "quantize_for", spy)
    rep = ct.write_compressed_tensors(Checkpoint(sources("moe")), get_scheme("fp8"), tmp_path / "out", progress=False)
    c = Checkpoint(sources("moe")).config
    want = [nk for i in range(c.num_hidden_layers) for nk in
            [*c.linear_shapes(i).values(), *(nk for _, _, nk in c.expert_linears(i).values())]]
    assert len(rep.quantized) == 218 and sorted(seen) == sorted(want)  # each one 2-D, one Linear's rows


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["fp8", "q8_0"])
def test_dry_run_of_the_multimodal_moe(sources, tmp_path, capsys, monkeypatch, scheme):
    """`quantize --dry-run` on a Gemma4ForConditionalGeneration MoE: the experts' rows and the towers for
    compressed-tensors; for GGUF the mmproj line (vision and audio towers, as llama.cpp's converter names
    the file); nothing written either way."""
    from tests.reliability import run_cli

    monkeypatch.setenv("COLUMNS", "200")
    r = run_cli(["quantize", sources("moe-mm"), "--scheme", scheme, "--algorithm", "rtn", "--dry-run",
                 "--out", tmp_path / ("o.gguf" if scheme == "q8_0" else "o")], capsys)
    assert r.code == 0, r.stderr
    assert "Nothing was written" in r.stdout and not (tmp_path / "o").exists() and not list(tmp_path.iterdir())
    assert ("and beside it mmproj-" in r.stdout and "vision and audio towers + embedders (F16" in r.stdout) == \
        (scheme == "q8_0")
    if scheme == "fp8":
        assert "layers.*.experts.*.gate_proj" in r.stdout and "vision/audio tower" in r.stdout


@pytest.mark.slow
def test_unbounded_clip_buffers_of_the_towers_are_copied(sources, tmp_path):
    """A clipped Linear's ±inf bounds (transformers' default: no clipping) are values, not corruption:
    copied as they are; a NaN anywhere is still refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    from gemmaquant.export.compressed_tensors import write_compressed_tensors

    src = tmp_path / "src"
    shutil.copytree(sources("e2b-mm"), src)
    sd = load_file(src / "model.safetensors")
    bound = next(n for n in sd if n.endswith("input_max"))
    sd[bound] = torch.full_like(sd[bound], float("inf"))
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    write_compressed_tensors(Checkpoint(src), get_scheme("fp8"), tmp_path / "out", progress=False)
    assert _stored(tmp_path / "out")[bound] == _stored(src)[bound]
    sd[bound] = torch.full_like(sd[bound], float("nan"))
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GemmaQuantError, match=f"'{re.escape(bound)}' contains NaN"):
        write_compressed_tensors(Checkpoint(src), get_scheme("fp8"), tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()
