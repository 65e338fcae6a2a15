"""Gemma 4's mmproj (vision, and audio on E2B/E4B) against `convert_hf_to_gguf.py --mmproj` of the pinned
llama.cpp, for every type we offer, from tiny Gemma4ForConditionalGeneration checkpoints saved by
transformers: E2B-like (vision + audio) and 31B-like (vision only, standardizing, clipped Linears);
libmtmd loading the pair and encoding an image as transformers does; the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.export.gguf.mmproj import OUTTYPES, default_mmproj_path, plan_mmproj, write_mmproj
from gemmaquant.formats.checkpoint import Checkpoint
from tests.tiny_gemma4 import make_tiny_gemma4

from tests.llamacpp import mtmd_image_embeddings

from . import llamacpp_ref as ref

# every test here builds a tiny Gemma 4 with its towers (~3 s quiet, 6 s under load): kept out of the fast
# tier, which ran 50.6 s of its minute before (RESULTS §7); the llama.cpp comparisons are slow anyway
pytestmark = pytest.mark.slow
# (variant, source dtype): the f16 source keeps f16 through softplus and the F32 widening, as the converter
SOURCES = [("e2b-mm", torch.bfloat16), ("dense-mm", torch.bfloat16), ("e2b-mm", torch.float16)]
SOURCE_IDS = [f"{v}-{str(dt).split('.')[-1]}" for v, dt in SOURCES]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(variant, dtype) -> checkpoint directory (built on first use)."""
    pytest.importorskip("transformers")
    root, made = tmp_path_factory.mktemp("g4mm"), {}

    def get(variant: str, dtype=torch.bfloat16):
        key = (variant, dtype)
        if key not in made:
            made[key] = root / f"tiny-gemma4-{variant}-{str(dtype).split('.')[-1]}"
            make_tiny_gemma4(variant, made[key], dtype=dtype)
        return made[key]
    return get


@pytest.fixture(scope="module")
def converted(tiny):
    """(variant, dtype) -> {outtype: the converter's mmproj}, every conversion in one converter process."""
    types = list(OUTTYPES)
    outs = iter(ref.convert_many([(tiny(v, dt), t + "+mmproj") for v, dt in SOURCES for t in types]))
    return {(v, dt): {t: next(outs) for t in types} for v, dt in SOURCES}


@pytest.mark.parametrize("outtype", list(OUTTYPES))
@pytest.mark.parametrize("source", SOURCES, ids=SOURCE_IDS)
@pytest.mark.llamacpp
@pytest.mark.subprocess
def test_mmproj_identical_to_the_converter(tiny, converted, tmp_path, source, outtype):
    rep = write_mmproj(Checkpoint(tiny(*source)), outtype, tmp_path / "mmproj.gguf")
    assert rep.path.read_bytes() == converted[source][outtype].read_bytes()


@pytest.mark.llamacpp
@pytest.mark.subprocess
def test_unbounded_clip_bounds_and_layer_scalars_as_the_converter_writes_them(tiny, tmp_path):
    """transformers saves an unclipped Linear's bounds as ±inf: values, copied as the converter copies them;
    a NaN is refused. A vision `layer_scalar` (which transformers 5.23's encoder does not have, the
    converter maps to `v.blk.N.out_scale.weight`) is written as it writes it."""
    from safetensors.torch import load_file, save_file

    src = shutil.copytree(tiny("dense-mm"), tmp_path / "tiny-gemma4-unbounded")
    sd = load_file(src / "model.safetensors")
    bounds = sorted(n for n in sd if n.startswith("model.vision_tower.") and n.endswith(("_min", "_max")))
    for n in bounds[:4]:
        sd[n] = torch.full_like(sd[n], float("-inf") if n.endswith("_min") else float("inf"))
    for i in range(2):
        sd[f"model.vision_tower.encoder.layers.{i}.layer_scalar"] = torch.tensor([0.5 + i], dtype=torch.bfloat16)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    want = ref.convert_mmproj(src, "f32")
    ours = write_mmproj(Checkpoint(src), "f32", tmp_path / "a.gguf")
    assert ours.path.read_bytes() == want.read_bytes()
    assert {t.name for t in ours.tensors} >= {"v.blk.0.out_scale.weight", "v.blk.1.out_scale.weight"}
    sd[bounds[0]] = torch.full_like(sd[bounds[0]], float("nan"))
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GemmaQuantError, match=f"'{bounds[0]}' contains NaN"):
        write_mmproj(Checkpoint(src), "f32", tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()


def test_plan_names_types_and_shapes(tiny):
    """The rules on the E2B-like model: clip bounds [1] F32, the patch kernel [H, 3, p, p] (F16 in an f16
    file, F32 otherwise), the depthwise conv [C, k] and every audio subsampling weight F32, the
    projections at the output type; one pass over the towers, nothing of the text model."""
    d = tiny("e2b-mm")
    by = {t: {x.name: x for x in plan_mmproj(Checkpoint(d), t)} for t in ("f16", "q8_0")}
    f16, q8 = by["f16"], by["q8_0"]
    assert f16["v.patch_embd.weight"].shape == (32, 3, 4, 4) and f16["v.patch_embd.weight"].type.name == "F16"
    assert q8["v.patch_embd.weight"].type.name == "F32"
    assert f16["v.position_embd.weight"].type.name == "F32" and f16["a.blk.0.conv_dw.weight"].shape == (32, 5)
    assert {f16[n].type.name for n in ("a.conv1d.0.weight", "a.conv1d.1.weight", "a.input_projection.weight",
                                       "a.blk.0.conv_dw.weight")} == {"F32"}
    assert f16["a.blk.0.attn_q.input_max"].shape == (1,) and f16["a.blk.0.attn_q.input_max"].type.name == "F32"
    assert f16["a.blk.0.per_dim_scale.weight"].transform == "softplus"
    assert q8["mm.input_projection.weight"].type.name == "Q8_0" and q8["mm.a.input_projection.weight"].type.name == "F16"
    assert not any(n.startswith(("blk.", "token_embd")) for n in f16)


def test_refusals(tiny, tmp_path):
    """One line each, nothing written: no image normalization, a text-only checkpoint, no vision tower,
    no vision_config, audio tensors without an audio_config, pooling llama.cpp does not do."""
    d = tiny("e2b-mm")

    def variant(name, edit=None, drop=None, remove=None):
        out = shutil.copytree(d, tmp_path / name)
        if remove:
            (out / remove).unlink()
        if edit:
            cfg = json.loads((out / "config.json").read_text())
            edit(cfg)
            (out / "config.json").write_text(json.dumps(cfg))
        if drop:
            from safetensors.torch import load_file, save_file

            sd = load_file(out / "model.safetensors")
            save_file({k: v for k, v in sd.items() if not k.startswith(drop)}, out / "model.safetensors",
                      metadata={"format": "pt"})
        return Checkpoint(out)

    cases = [
        (variant("noproc", remove="preprocessor_config.json"), "no 'image_mean' list in preprocessor_config.json or processor_config.json"),
        (variant("novision", drop="model.vision_tower."), r"no vision tower tensors \(model.vision_tower.\*\)"),
        (variant("novc", edit=lambda c: c.pop("vision_config")), "no 'vision_config' object"),
        (variant("noac", edit=lambda c: c.update(audio_config=None)),
         "no 'audio_config' object, but the checkpoint has audio tower tensors"),
        (variant("pool4", edit=lambda c: c["vision_config"].update(pooling_kernel_size=4)),
         r"pooling_kernel_size is 4; llama.cpp's Gemma 4 vision encoder pools 3x3 \(allowed: 3\)"),
    ]
    text_only = tmp_path / "text"
    make_tiny_gemma4("e2b", text_only)
    cases.append((Checkpoint(text_only), "not a multimodal checkpoint"))
    for ck, msg in cases:
        with pytest.raises(GemmaQuantError, match=msg):
            write_mmproj(ck, "f16", tmp_path / "x.gguf")
        assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(GemmaQuantError, match="mmproj type 'q4_k_m' is not supported.*f32, f16, bf16, q8_0"):
        write_mmproj(Checkpoint(d), "q4_k_m", tmp_path / "x.gguf")


def test_default_name_is_llama_cpps(tiny, tmp_path):
    # what `convert_hf_to_gguf.py gemma-4-E2B-it --mmproj --outtype q8_0 --outfile OUTDIR/` named it
    d = shutil.copytree(tiny("e2b-mm"), tmp_path / "gemma-4-E2B-it")
    assert default_mmproj_path(Checkpoint(d), "q8_0", tmp_path).name == "mmproj-Gemma-4-E2B-It-Q8_0.gguf"


@pytest.mark.parametrize("variant,outtype", [("e2b-mm", "f16"), ("dense-mm", "f32")])
@pytest.mark.llamacpp
@pytest.mark.subprocess
def test_libmtmd_encodes_an_image_as_transformers_does(tiny, tmp_path, variant, outtype):
    """Our text GGUF + mmproj load in libmtmd (vision, and audio where the model has it); a 108x108 image
    (27x27 patches of 4, pooled 3x3: 81 tokens, no resize on either side) encodes to the embeddings of
    transformers' get_image_features on its own image processor's patches. Within 3 % of the largest
    value: llama.cpp's vision graph rounds through f16 (GELU table, attention) and differs by ~1 % with
    f32 and f16 weights alike (RESULTS.md §10)."""
    pytest.importorskip("PIL")
    import transformers
    from PIL import Image

    from gemmaquant.export.gguf.writer import write_gguf

    d = tiny(variant)
    text = write_gguf(Checkpoint(d), "bf16", tmp_path / "text.gguf").path
    proj = write_mmproj(Checkpoint(d), outtype, tmp_path / "mmproj.gguf").path
    rgb = np.random.default_rng(0).integers(0, 256, size=(108, 108, 3)).astype(np.uint8)
    # clip warmup stays off: the tiny audio tower's subsampling channels [8, 4] give an 8-wide input
    # projection, and clip's audio warmup feeds llama.cpp's fixed 128-mel front end (128 wide) into it;
    # with channels [128, 4] the same pair loads with warmup on (checked by hand)
    got, vision, audio = mtmd_image_embeddings(text, proj, rgb, ("<|turn>user\n", "<turn|>\n"))
    assert vision and audio == (variant == "e2b-mm")
    ip = transformers.Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=3, do_resize=False)
    px = ip(images=[Image.fromarray(rgb)], return_tensors="pt", do_resize=False)  # image_mean 0, std 1
    hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.model.get_image_features(pixel_values=px["pixel_values"],
                                           image_position_ids=px["image_position_ids"]).pooler_output[0].numpy()
    assert got.shape == want.shape == (81, hf.config.text_config.hidden_size)
    assert np.abs(got - want).max() < 3e-2 * np.abs(want).max()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999



@pytest.mark.llamacpp
@pytest.mark.subprocess
def test_quantize_writes_the_mmproj_beside_the_gguf(tiny, converted, tmp_path, capsys, monkeypatch):
    """A GGUF of a multimodal Gemma 4 gets the converter's mmproj beside it (f16 unless --mmproj says
    otherwise); a second preset keeps it; --mmproj none writes none; --dry-run names it."""
    from gemmaquant.pipeline import QuantizeOptions, run_quantize
    from gemmaquant.schemes import get_scheme
    from tests.reliability import run_cli

    d = tiny("e2b-mm")
    ck = Checkpoint(d)
    want = converted[("e2b-mm", torch.bfloat16)]
    proj = default_mmproj_path(ck, "f16", tmp_path)
    s1 = run_quantize(ck, get_scheme("q8_0"), tmp_path / "a.Q8_0.gguf", QuantizeOptions())
    assert proj.read_bytes() == want["f16"].read_bytes()
    assert any(f"vision and audio towers + embedders: {proj.name} beside it" in n for n in s1.notes)
    before = proj.stat().st_mtime_ns
    s2 = run_quantize(ck, get_scheme("q4_0"), tmp_path / "a.Q4_0.gguf", QuantizeOptions())
    assert proj.stat().st_mtime_ns == before and any("kept" in n for n in s2.notes)
    run_quantize(ck, get_scheme("q8_0"), tmp_path / "b" / "a.gguf", QuantizeOptions(mmproj="bf16"))
    assert default_mmproj_path(ck, "bf16", tmp_path / "b").read_bytes() == want["bf16"].read_bytes()
    s3 = run_quantize(ck, get_scheme("q8_0"), tmp_path / "c" / "a.gguf", QuantizeOptions(mmproj="none"))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a.gguf"]
    assert any("vision/audio towers not written (--mmproj none)" in n for n in s3.notes)
    monkeypatch.setenv("COLUMNS", "250")
    r = run_cli(["quantize", d, "--scheme", "q8_0", "--mmproj", "q8_0", "--dry-run", "--out", tmp_path / "e" / "a.gguf"],
                capsys)
    assert r.code == 0, r.stderr
    n = len(plan_mmproj(ck, "q8_0"))
    assert f"and beside it {default_mmproj_path(ck, 'q8_0', tmp_path).name}: the vision and audio towers + embedders " \
           f"(Q8_0, {n} tensors" in " ".join(r.stdout.split()) and not (tmp_path / "e").exists()


def test_inspect_shows_the_mmproj(tiny, tmp_path):
    """`inspect` on our mmproj: what gguf's GGUFReader reads (architecture, keys, every tensor's type and
    shape), with the clip keys of both towers."""
    import gguf

    from gemmaquant.evaluate.inspect import inspect_path

    p = write_mmproj(Checkpoint(tiny("e2b-mm")), "q8_0", tmp_path / "mmproj.gguf").path
    info, r = inspect_path(p), gguf.GGUFReader(p)
    assert info["kind"] == "gguf" and info["architecture"] == "clip" and info["file_type"] == "MOSTLY_Q8_0"
    assert [(t["name"], t["type"], t["shape"]) for t in info["tensors"]] == \
        [(t.name, t.tensor_type.name, [int(x) for x in reversed(t.shape)]) for t in r.tensors]  # ne reversed
    assert set(info["metadata"]) == {k for k in r.fields if not k.startswith("GGUF.")}
    meta = info["metadata"]
    assert meta["clip.vision.projector_type"] == "gemma4v" and meta["clip.audio.projector_type"] == "gemma4a"
    assert meta["clip.has_audio_encoder"] is True and meta["clip.vision.image_size"] == 224


def test_quantize_refuses_before_writing_anything(tiny, tmp_path, capsys):
    """An mmproj the run would refuse (here: no image normalization) stops quantize and --dry-run before
    the text GGUF is written, in one line naming the fix (--mmproj none: tested above)."""
    from gemmaquant.pipeline import QuantizeOptions, run_quantize
    from gemmaquant.schemes import get_scheme
    from tests.reliability import run_cli

    src = shutil.copytree(tiny("e2b-mm"), tmp_path / "src")
    (src / "preprocessor_config.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(GemmaQuantError, match="no 'image_mean' list.*--mmproj none writes the GGUF without it"):
        run_quantize(Checkpoint(src), get_scheme("q8_0"), out / "a.gguf", QuantizeOptions())
    assert not out.exists()
    r = run_cli(["quantize", src, "--scheme", "q8_0", "--dry-run", "--out", out / "a.gguf"], capsys)
    assert r.code == 2 and "no 'image_mean' list" in r.stderr and not out.exists()
