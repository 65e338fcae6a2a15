"""compressed-tensors outputs of multimodal Gemma 3 (Gemma3ForConditionalGeneration), from each tensor-name
layout transformers writes: transformers + compressed-tensors load them as the multimodal architecture with
no missing or unexpected keys, the vision tower and projector equal to the source, and the same text
logits as our dequantized forward pass."""

from __future__ import annotations

import json

import pytest
import torch

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.export import write_compressed_tensors
from gemmaquant.schemes import get_scheme
from tests.tiny_mm import LAYOUTS, make_tiny_mm

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

PROCESSOR_FILES = ("processor_config.json", "chat_template.jinja", "tokenizer.model", "tokenizer_config.json")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return make_tiny_mm(tmp_path_factory.mktemp("mm"))


def _cases():
    """Every scheme on every layout; the fast tier keeps w4a16 on layout C (what a transformers 5 save is)."""
    return [pytest.param(s, k, id=f"{s}-{k}", marks=() if (s, k) == ("w4a16", "C") else pytest.mark.slow)
            for s in ("w4a16", "int8-w8a16", "fp8") for k in LAYOUTS]


@pytest.mark.parametrize("scheme,layout", _cases())
def test_transformers_loads_the_multimodal_output(layouts, tmp_path, layout, scheme):
    from gemmaquant.evaluate.artifact import open_artifact

    src, out = layouts[layout], tmp_path / "out"
    rep = write_compressed_tensors(Checkpoint(src), get_scheme(scheme), out, progress=False)
    assert len(rep.quantized) == 2 * 7
    assert any(f"the source's: {layout})" in n for n in rep.notes)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"] and "vision_config" in cfg
    assert cfg["quantization_config"]["ignore"] == ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
    for name in PROCESSOR_FILES + (("preprocessor_config.json",) if layout in "AB" else ()):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name

    model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = transformers.Gemma3ForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    for part in ("vision_tower", "multi_modal_projector"):
        got, want = dict(getattr(model.model, part).named_parameters()), dict(getattr(ref.model, part).named_parameters())
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part

    art = open_artifact(str(out), torch.float32)
    ids = torch.randint(4, 260, (1, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
        ours = art.model(ids)
        source = ref(input_ids=ids).logits
    rel = float((ours - theirs).norm() / theirs.norm())
    if scheme != "fp8":  # weight-only: both run the same dequantized weights
        assert rel < 1e-5, rel
    else:  # transformers fake-quantizes the activations per token (on these random weights: 7%)
        assert torch.isfinite(theirs).all() and rel < 0.2, rel
    assert float((theirs - source).norm() / source.norm()) > 1e-4  # the text Linears were quantized


@pytest.mark.slow
def test_calibrated_scheme_runs_on_the_text_model(layouts, tmp_path):
    """GPTQ calibrates the text model of a multimodal checkpoint on text (the vision tower is not run)."""
    from gemmaquant.pipeline import QuantizeOptions, run_quantize

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    summary = run_quantize(Checkpoint(layouts["C"]), get_scheme("w4a16"), tmp_path / "out",
                           QuantizeOptions(algorithm="gptq", calib=text, calib_samples=4, calib_len=32))
    assert summary.family == "compressed-tensors"
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
