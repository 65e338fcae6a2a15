"""The mmproj (llama.cpp's clip GGUF of the vision tower + projector) against convert_hf_to_gguf.py --mmproj,
from every tensor-name layout transformers writes, and llama.cpp's multimodal library (libmtmd) loading the
text GGUF + mmproj pair and encoding an image as transformers does.

llama.cpp's converter reads only layout A (B/D give an mmproj with no tensors, C an error), so for B/C/D
the reference is the converter on the same files with the tensors renamed to A, in a directory of the
same name (general.name comes from it)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.errors import GemmaQuantError
from gemmaquant.export.gguf.mmproj import OUTTYPES, default_mmproj_path, write_mmproj
from tests.tiny_mm import LAYOUTS, make_tiny_mm, to_a

from tests.llamacpp import mtmd_image_embeddings

from . import llamacpp_ref as ref

pytestmark = [pytest.mark.llamacpp, pytest.mark.subprocess]


def _as_layout_a(src, root):
    """`src`'s files with every tensor renamed to layout A, in root/<same directory name>."""
    from safetensors.torch import load_file, save_file

    out = root / src.name
    shutil.copytree(src, out)
    save_file({to_a(k): v for k, v in load_file(src / "model.safetensors").items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    """layout -> (checkpoint, {outtype: converter's mmproj}, converter's bf16 text GGUF)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("mm")
    dirs = make_tiny_mm(root / "src")
    refs = {k: d if k == "A" else _as_layout_a(d, root / f"ref{k}") for k, d in dirs.items()}
    types = list(OUTTYPES)
    jobs = [(refs[k], t + "+mmproj") for k in LAYOUTS for t in types] + [(dirs[k], "bf16") for k in LAYOUTS]
    outs = iter(ref.convert_many(jobs))
    mmproj = {k: {t: next(outs) for t in types} for k in LAYOUTS}
    return {k: (dirs[k], mmproj[k], next(outs)) for k in LAYOUTS}


@pytest.mark.parametrize("outtype", list(OUTTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mmproj_identical_to_the_converter(mm, tmp_path, layout, outtype):
    d, want, _ = mm[layout]
    rep = write_mmproj(Checkpoint(d), outtype, tmp_path / "mmproj.gguf")
    assert rep.path.read_bytes() == want[outtype].read_bytes()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_text_gguf_of_a_multimodal_checkpoint_matches_the_converter(mm, tmp_path, layout):
    from gemmaquant.export.gguf.writer import write_gguf

    d, _, want = mm[layout]
    ours = write_gguf(Checkpoint(d), "bf16", tmp_path / "text.gguf").path
    assert ref.kv_and_tensors(ours) == ref.kv_and_tensors(want)


@pytest.mark.parametrize("dirname,outtype,want", [
    # what `convert_hf_to_gguf.py DIR --mmproj --outtype T --outfile OUTDIR/` named these files
    ("tiny-gemma-3-mm", "f16", "mmproj-Tiny-Gemma-3-Mm-F16.gguf"),
    ("gemma-3-4b-it", "f16", "mmproj-gemma-3-4b-it-F16.gguf"),
    ("gemma-3-4b-it", "q8_0", "mmproj-gemma-3-4b-it-Q8_0.gguf"),
])
def test_default_name_is_llama_cpps(mm, tmp_path, dirname, outtype, want):
    d = shutil.copytree(mm["A"][0], tmp_path / dirname)
    assert default_mmproj_path(Checkpoint(d), outtype, tmp_path).name == want


def test_refusals(mm, tmp_path):
    d, _, _ = mm["C"]
    with pytest.raises(GemmaQuantError, match="mmproj type 'q4_k_m' is not supported.*f32, f16, bf16, q8_0"):
        write_mmproj(Checkpoint(d), "q4_k_m", tmp_path / "x.gguf")
    bad = tmp_path / "noproc"
    shutil.copytree(d, bad)
    (bad / "processor_config.json").unlink()
    with pytest.raises(GemmaQuantError, match="no 'image_mean' list"):
        write_mmproj(Checkpoint(bad), "f16", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_libmtmd_encodes_an_image_as_transformers_does(mm, tmp_path, outtype):
    """Our text GGUF + mmproj load in libmtmd; a 32x32 image (4 tokens after pooling) encodes to the
    embeddings transformers' get_image_features gives (f32/f16 weights: within 1e-3)."""
    import transformers

    from gemmaquant.export.gguf.writer import write_gguf
    from tests.tiny_mm import MM_TOKENS, TEXT

    d, _, _ = mm["D"]
    text = write_gguf(Checkpoint(d), "bf16", tmp_path / "text.gguf").path
    proj = write_mmproj(Checkpoint(d), outtype, tmp_path / "mmproj.gguf").path
    rgb = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3)).astype(np.uint8)
    got, vision, _ = mtmd_image_embeddings(text, proj, rgb, ("<start_of_turn>user\n", "<end_of_turn>\n"))
    assert vision
    assert got.shape == (MM_TOKENS, TEXT["hidden_size"]) and np.isfinite(got).all()
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0 - 0.5) / 0.5  # image_mean = std = 0.5
    with torch.no_grad():
        feats = hf.model.get_image_features(pixel_values=x)
    feats = getattr(feats, "pooler_output", feats).reshape(-1, TEXT["hidden_size"]).numpy()
    assert np.abs(got - feats).max() < 1e-3 * max(1.0, np.abs(feats).max())


def test_quantize_writes_the_mmproj_beside_the_gguf(mm, tmp_path):
    """A GGUF of a multimodal model gets llama.cpp's mmproj beside it (f16 unless --mmproj says otherwise);
    a second preset in the same folder keeps it; --mmproj none writes none; other uses are refused."""
    from gemmaquant.pipeline import QuantizeOptions, run_quantize
    from gemmaquant.schemes import get_scheme

    d, want, _ = mm["C"]
    ck = Checkpoint(d)
    s1 = run_quantize(ck, get_scheme("q8_0"), tmp_path / "a.Q8_0.gguf", QuantizeOptions())
    proj = tmp_path / "mmproj-Tiny-Gemma-3-Mm-F16.gguf"
    assert proj.read_bytes() == want["f16"].read_bytes() and any(proj.name in n for n in s1.notes)
    before = proj.stat().st_mtime_ns
    s2 = run_quantize(ck, get_scheme("q4_0"), tmp_path / "a.Q4_0.gguf", QuantizeOptions())
    assert proj.stat().st_mtime_ns == before and any("kept" in n for n in s2.notes)
    run_quantize(ck, get_scheme("q4_0"), tmp_path / "b" / "a.gguf", QuantizeOptions(mmproj="q8_0"))
    assert (tmp_path / "b" / "mmproj-Tiny-Gemma-3-Mm-Q8_0.gguf").read_bytes() == want["q8_0"].read_bytes()
    run_quantize(ck, get_scheme("q4_0"), tmp_path / "c" / "a.gguf", QuantizeOptions(mmproj="none"))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a.gguf"]
    with pytest.raises(GemmaQuantError, match="--mmproj q8_0: the vision tower's GGUF needs a GGUF scheme"):
        run_quantize(ck, get_scheme("fp8"), tmp_path / "ct", QuantizeOptions(mmproj="q8_0"))


def test_a_multimodal_set_writes_the_mmproj_once(mm, tmp_path):
    """`--scheme a,b --out DIR/` of a multimodal model: each text GGUF as the converter's bf16 + llama-quantize,
    one mmproj beside them all, named in each file's summary."""
    from gemmaquant.pipeline import QuantizeOptions, run_quantize_set
    from gemmaquant.schemes import get_scheme

    d, want, bf16 = mm["A"]
    out = run_quantize_set(Checkpoint(d), [get_scheme("q8_0"), get_scheme("q4_0")], tmp_path / "set", QuantizeOptions())
    proj = tmp_path / "set" / "mmproj-Tiny-Gemma-3-Mm-F16.gguf"
    assert proj.read_bytes() == want["f16"].read_bytes()
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == sorted([proj.name] + [s.output.name for s in out])
    for s in out:
        assert s.output.read_bytes() == ref.quantize(bf16, tmp_path / "ref.gguf", get_scheme(s.scheme).ftype).read_bytes()
        assert any(proj.name in n for n in s.notes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_f32_and_f16_sources(tmp_path, dtype):
    """An f32 source is written like a bf16 one (widened values), an f16 one keeps f16 through the
    soft-emb-norm +1 as the converter does; both byte-identical for every type (layout D vs its A copy)."""
    d = make_tiny_mm(tmp_path / "src", dtype=dtype)["D"]
    a = _as_layout_a(d, tmp_path / "refD")
    types = list(OUTTYPES)
    for t, want in zip(types, ref.convert_many([(a, t + "+mmproj") for t in types])):
        assert write_mmproj(Checkpoint(d), t, tmp_path / f"{t}.gguf").path.read_bytes() == want.read_bytes(), t
