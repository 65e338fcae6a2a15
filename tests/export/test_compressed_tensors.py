"""End to end: tiny random Gemma 1/2/3 bf16 checkpoints (written by transformers) -> our writer ->
loaded back by transformers + compressed-tensors, which must decompress every Linear to exactly our
dequantization of the written tensors; plus the layout rules of docs/vllm-formats.md and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.numerics.ct import dequantize_tensors, quantize_for
from gemmaquant.errors import GemmaQuantError, OutputError
from gemmaquant.export import write_compressed_tensors
from gemmaquant.schemes import SCHEMES, get_scheme

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from safetensors import safe_open  # noqa: E402

# transformers warns that the checkpoint's own quantization_config wins over the dequantize=True we pass
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

CT_SCHEMES = [s.name for s in SCHEMES.values() if s.family == "compressed-tensors"]
COMMON = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=1, head_dim=64)
GENERATIONS = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=16, query_pre_attn_scalar=64)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(sliding_window=16, query_pre_attn_scalar=64)),
}
# relative Frobenius weight error after decompression (random N(0, 0.02) weights, K = 256 or 512)
ERROR_RANGE = {"fp8": (0.015, 0.035), "fp8-static": (0.015, 0.035), "int8": (0.004, 0.013),
               "int8-w8a16": (0.004, 0.013), "w4a16": (0.08, 0.2), "w4a16-asym": (0.07, 0.2)}


def _side_files() -> dict[str, bytes | str]:
    """Side files a checkpoint carries (the writer copies them byte for byte): a real 512-token
    tokenizer (the writer refuses a tokenizer that does not load or fit the embedding) and configs."""
    from gemmaquant.formats.spm_proto import decode_model_proto
    from gemmaquant.formats.tokenizer_json import tokenizer_json_text

    from ..reliability import tiny_tokenizer_model

    spm = tiny_tokenizer_model(COMMON["vocab_size"])
    pieces = decode_model_proto(spm).pieces
    return {"tokenizer.json": tokenizer_json_text(pieces, unk_id=3, bos_id=2),
            "tokenizer_config.json": '{"model_max_length": 8}', "special_tokens_map.json": "{}",
            "tokenizer.model": spm}


SIDE = _side_files()


def _make(gen: str, out: Path, **overrides) -> Path:
    cfg_cls, model_cls, extra = GENERATIONS[gen]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # HF inits norms to 0: randomize so a wrong norm copy would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for name, data in SIDE.items():
        (out / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    (out / "README.md").write_text("---\nlicense: gemma\n---\n# tiny\n")
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {g: _make(g, root / g) for g in GENERATIONS}


def _input_scales(ckpt: Checkpoint) -> dict[str, float]:
    return {n.removesuffix(".weight"): 0.01 + 0.001 * i
            for i, n in enumerate(n for n in ckpt.names() if n.endswith("_proj.weight"))}


def _read(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            assert sf.metadata() == {"format": "pt"}
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def _write(src: Path, scheme: str, out: Path, **kw):
    ckpt = Checkpoint(src)
    s = get_scheme(scheme)
    if s.input_activations is not None and not s.input_activations.dynamic:
        kw.setdefault("input_scales", _input_scales(ckpt))
    return ckpt, write_compressed_tensors(ckpt, s, out, force=False, command=f"gemmaquant quantize {src} {scheme}",
                                          progress=False, **kw)


def _scheme_x_generation():
    """Every scheme on every generation; the fast tier keeps one generation per scheme (rotating, so
    each generation and each scheme is in it), the slow tier adds the rest."""
    gens = list(GENERATIONS)
    return [pytest.param(s, g, id=f"{s}-{g}", marks=() if i % len(gens) == j else pytest.mark.slow)
            for i, s in enumerate(CT_SCHEMES) for j, g in enumerate(gens)]


@pytest.mark.parametrize("scheme,gen", _scheme_x_generation())
def test_transformers_loads_our_output_and_decompresses_to_our_dequant(sources, tmp_path, gen, scheme):
    src, out = sources[gen], tmp_path / "out"
    ckpt, report = _write(src, scheme, out, drift={"kl": 0.0123})
    s = get_scheme(scheme)
    written = _read(out)
    source = _read(src)

    # layout: exactly the declared tensors, no lm_head, copies byte for byte
    modules = sorted(n.removesuffix(".weight") for n in source if n.endswith("_proj.weight"))
    assert len(modules) == 14 and sorted(report.quantized) == modules
    suffix = {"float-quantized": {"weight", "weight_scale"}, "int-quantized": {"weight", "weight_scale"},
              "pack-quantized": {"weight_packed", "weight_scale", "weight_shape"}}[s.ct_format]
    if scheme == "fp8-static":
        suffix = suffix | {"input_scale"}
    if scheme == "w4a16-asym":
        suffix = suffix | {"weight_zero_point"}
    copied = {n for n in source if not n.endswith("_proj.weight")}
    assert set(written) == copied | {f"{m}.{x}" for m in modules for x in suffix}
    assert "lm_head.weight" not in written
    for n in copied:
        assert written[n].dtype == torch.bfloat16
        assert written[n].view(torch.uint8).numpy().tobytes() == source[n].view(torch.uint8).numpy().tobytes()

    cfg_src = (src / "config.json").read_text()
    cfg_out = (out / "config.json").read_text()
    assert cfg_out.startswith(cfg_src[:cfg_src.rfind("}")].rstrip())  # source text kept verbatim
    qc = json.loads(cfg_out)["quantization_config"]
    assert qc["format"] == qc["config_groups"]["group_0"]["format"] == s.ct_format
    assert qc["ignore"] == ["lm_head"] and qc["quantization_status"] == "compressed"
    assert set(qc["config_groups"]["group_0"]["weights"]) == {
        "num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
        "observer", "observer_kwargs"}
    for name, data in SIDE.items():
        assert (out / name).read_bytes() == (data if isinstance(data, bytes) else data.encode())
    card = (out / "README.md").read_text()
    assert "base_model_relation" not in card or "base_model:" in card
    assert "license: \"gemma\"" in card and f"gemmaquant quantize {src} {scheme}" in card and "0.0123" in card

    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    lo, hi = ERROR_RANGE[scheme]
    linears = dict(model.named_modules())
    for m in modules:
        t = {k.removeprefix(m + "."): v for k, v in written.items() if k.startswith(m + ".")}
        ours = dequantize_tensors(t, s.ct_format, s.weights.num_bits)
        theirs = linears[m].weight.data
        assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, ours), m
        # the writer wrote what round-to-nearest means for the source weight
        w = source[m + ".weight"]
        rtn = quantize_for(w, s.ct_format, s.weights,
                           input_scale=t.get("input_scale")).tensors()
        assert all(torch.equal(rtn[k].view(torch.uint8) if rtn[k].dtype == torch.float8_e4m3fn else rtn[k],
                               t[k].view(torch.uint8) if t[k].dtype == torch.float8_e4m3fn else t[k]) for k in t), m
        err = float((ours.float() - w.float()).norm() / w.float().norm())
        assert lo < err < hi, (m, err)
        assert report.weight_error[m] == pytest.approx(err, rel=1e-5)
    tied = model.get_output_embeddings().weight
    assert torch.equal(tied, written["model.embed_tokens.weight"])
    logits = model(torch.tensor([[2, 17, 99, 300, 5]])).logits
    assert logits.shape == (1, 5, 512) and torch.isfinite(logits).all()


@pytest.mark.parametrize("scheme", ["fp8", "w4a16"])
def test_compressed_load_decompresses_on_first_forward(sources, tmp_path, scheme):
    """Default transformers load (no dequantize): ct decompresses by a hook; same logits as dequantized.
    (Not asym: transformers 5.23 + ct 0.20 expect an unpacked [N, G] zero point on this path and refuse
    the packed [N/8, G] one that vLLM and ct's own compressor use; llm-compressor's output fails alike.)"""
    out = tmp_path / "out"
    _write(sources["gemma3"], scheme, out)
    ids = torch.tensor([[2, 17, 99, 300, 5]])
    packed = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    logits = packed(ids).logits
    assert torch.isfinite(logits).all()
    if scheme == "w4a16":  # weight-only: no activation fake-quant, so identical to the dequantized model
        deq = transformers.AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.bfloat16, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
        assert torch.equal(logits, deq(ids).logits)


def test_shards_and_index(sources, tmp_path):
    out = tmp_path / "out"
    _, report = _write(sources["gemma3"], "w4a16", out, max_shard_bytes=200_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert report.shards == len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    written = _read(out)
    assert set(index["weight_map"]) == set(written) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# -- bad input: one clear error, nothing left at the output path ---------------------------------
def _nothing_left(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _with_tensor(src: Path, dst: Path, name: str, fn) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    t[name] = fn(t[name])
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_unknown_and_non_ct_scheme(sources, tmp_path):
    with pytest.raises(GemmaQuantError, match="unknown scheme 'w3a16'"):
        get_scheme("w3a16")
    with pytest.raises(GemmaQuantError, match="not a compressed-tensors scheme"):
        write_compressed_tensors(Checkpoint(sources["gemma"]), get_scheme("q4_k_m"), tmp_path / "o", progress=False)
    _nothing_left(tmp_path / "o")


def test_existing_output_needs_force_and_must_be_ours(sources, tmp_path):
    """--force replaces our own output directory, never one that holds anything we did not write."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(OutputError, match="not a gemmaquant output"):
            write_compressed_tensors(Checkpoint(sources["gemma"]), get_scheme("int8"), foreign, force=force,
                                     progress=False)
        assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    out = tmp_path / "out"
    _write(sources["gemma"], "int8", out)
    assert json.loads((out / "gemmaquant.json").read_text())["files"] == sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputError, match="already exists"):
        _write(sources["gemma"], "int8", out)
    write_compressed_tensors(Checkpoint(sources["gemma"]), get_scheme("fp8"), out, force=True, progress=False)
    assert "fp8" in (out / "gemmaquant.json").read_text()
    (out / "notes.md").write_text("the user's own notes")  # no longer only ours: never deleted
    with pytest.raises(OutputError, match="'notes.md', which gemmaquant did not write"):
        write_compressed_tensors(Checkpoint(sources["gemma"]), get_scheme("int8"), out, force=True, progress=False)
    assert (out / "notes.md").read_text() == "the user's own notes"
    with pytest.raises(OutputError, match="is an input"):
        write_compressed_tensors(Checkpoint(sources["gemma"]), get_scheme("int8"), sources["gemma"], force=True,
                                 progress=False)


def test_nan_weight_names_the_tensor(sources, tmp_path):
    bad = "model.layers.1.mlp.down_proj.weight"

    def poison(t):
        t = t.clone()
        t[3, 7] = float("nan")
        return t
    src = _with_tensor(sources["gemma2"], tmp_path / "src", bad, poison)
    out = tmp_path / "out"
    with pytest.raises(GemmaQuantError, match=f"'{bad}' contains NaN"):
        _write(src, "fp8", out)
    _nothing_left(out)


def test_group_size_mismatch(tmp_path):
    src = _make("gemma3", tmp_path / "src", intermediate_size=320)  # 320 = 5 * 64
    out = tmp_path / "out"
    with pytest.raises(GemmaQuantError, match=r"down_proj.weight' has input width 320.*group size 128.*32, 64"):
        _write(src, "w4a16", out)
    _nothing_left(out)


def test_static_fp8_needs_input_scales(sources, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(GemmaQuantError, match="static activation scales"):
        _write(sources["gemma"], "fp8-static", out, input_scales={})
    _nothing_left(out)


def test_interrupt_leaves_nothing(sources, tmp_path, monkeypatch):
    import gemmaquant.export.compressed_tensors as so
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return quantize_for(*a, **k)
    monkeypatch.setattr(so, "quantize_for", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _write(sources["gemma3"], "w4a16", out)
    _nothing_left(out)


def test_precomputed_results_are_written_as_given(sources, tmp_path):
    """A calibrated algorithm's codes/scales (here: RTN codes under a 2x larger scale) replace RTN for
    the Linears it covers; the rest are rounded to nearest. A Packed that does not fit is refused."""
    from gemmaquant.numerics.ct import int_codes, int_qparams, minmax, pack_int

    ckpt = Checkpoint(sources["gemma3"])
    m = "model.layers.1.mlp.down_proj"
    w = ckpt.tensor(m + ".weight").float()
    scale, zp = int_qparams(*minmax(w, "group", 128), 4, False)
    scale = scale * 2
    given = pack_int(int_codes(w, scale, zp, 4), scale, zp, 4)
    out = tmp_path / "out"
    _, report = _write(sources["gemma3"], "w4a16-asym", out, quantized={m: given}, base_model="google/gemma-3-270m")
    written = _read(out)
    for k, t in given.tensors().items():
        assert torch.equal(written[f"{m}.{k}"], t)
    assert report.weight_error[m] > report.weight_error["model.layers.0.mlp.down_proj"]
    card = (out / "README.md").read_text()
    assert 'base_model: "google/gemma-3-270m"\nbase_model_relation: quantized\n' in card

    bad = pack_int(int_codes(w[:, :256], scale[:, :2], zp[:, :2], 4), scale[:, :2], zp[:, :2], 4)
    with pytest.raises(GemmaQuantError, match=f"'{m}.weight_packed' is torch.int32 \\[256, 32\\]"):
        _write(sources["gemma3"], "w4a16-asym", tmp_path / "bad", quantized={m: bad})
    _nothing_left(tmp_path / "bad")
    with pytest.raises(GemmaQuantError, match="not a quantizable Linear"):
        _write(sources["gemma3"], "w4a16-asym", tmp_path / "bad", quantized={"lm_head": given})


@pytest.mark.parametrize("gen,src_dtype,keep,want", [
    ("gemma3", torch.float32, False, torch.bfloat16), ("gemma3", torch.float32, True, torch.float32),
    ("gemma3", torch.float16, False, torch.bfloat16), ("gemma", torch.float16, False, torch.float16),
])
def test_f32_and_f16_sources_are_written_in_bf16(tmp_path, gen, src_dtype, keep, want):
    """An f32 source's embedding in bf16 (half the bytes); an f16 Gemma 2/3 in bf16 (it must run in bf16);
    transformers loads the output in that dtype with the embedding equal to the source's, rounded."""
    src = _make(gen, tmp_path / "src")
    m = getattr(transformers, GENERATIONS[gen][1]).from_pretrained(src).to(src_dtype)
    m.save_pretrained(src)
    ckpt, rep = _write(src, "fp8", tmp_path / "out", keep_dtype=keep)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[want]
    assert cfg.get("dtype", cfg.get("torch_dtype")) == name
    assert bool(rep.notes) == (want != src_dtype)
    t = _read(tmp_path / "out")
    assert t["model.embed_tokens.weight"].dtype == want
    assert torch.equal(t["model.embed_tokens.weight"], ckpt.tensor("model.embed_tokens.weight").to(want))
    assert t["model.norm.weight"].dtype == want
    loaded = getattr(transformers, GENERATIONS[gen][1]).from_pretrained(tmp_path / "out")
    assert loaded.model.embed_tokens.weight.dtype == want


def test_group_size_is_checked_before_calibration(tmp_path, monkeypatch):
    """w4a16 GPTQ on a model whose Linear width does not divide by 128: refused before any calibration."""
    import gemmaquant.calib.pipeline as pipeline
    from gemmaquant.pipeline import QuantizeOptions, run_quantize

    src = _make("gemma3", tmp_path / "src", intermediate_size=320)

    def calibrate(*a, **k):
        raise AssertionError("calibration ran before the group-size check")

    monkeypatch.setattr(pipeline, "calibrate", calibrate)
    with pytest.raises(GemmaQuantError, match="input width 320"):
        run_quantize(Checkpoint(src), get_scheme("w4a16"), tmp_path / "out", QuantizeOptions(algorithm="gptq"))
    _nothing_left(tmp_path / "out")
