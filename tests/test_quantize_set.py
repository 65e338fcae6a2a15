"""`quantize --scheme a,b,c --out DIR/`: one GGUF per preset, each the single-preset command's file,
every output guarded and every refusal made before any work, the importance matrix computed once."""

from __future__ import annotations

import pytest

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.errors import GemmaQuantError, OutputError
from gemmaquant.pipeline import QuantizeOptions, default_output, run_quantize, run_quantize_set
from gemmaquant.schemes import get_scheme
from tests.export.gguf import llamacpp_ref as ref

SET = ["q8_0", "q4_k_m", "q3_k_s"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random bf16 Gemma 3 with 256-wide rows (each preset's own types), saved without transformers."""
    import json

    import torch
    from safetensors.torch import save_file

    from gemmaquant.formats.config import config_from_dict

    cfg = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=ref.TINY_VOCAB,
               hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=64, sliding_window=8, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    d = tmp_path_factory.mktemp("set") / "tiny-gemma3-256"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    save_file({k: (torch.randn(s, generator=g) * (0.3 if "norm" in k else 0.05)).to(torch.bfloat16)
               for k, s in config_from_dict(cfg).expected_shapes().items()}, d / "model.safetensors")
    ref.tiny_tokenizer(d)
    return Checkpoint(d)


@pytest.mark.slow  # six GGUF writes and an imatrix pass: ~10 s
@pytest.mark.parametrize("imatrix", [False, True])
def test_each_file_is_the_single_preset_file(ckpt, tmp_path, monkeypatch, imatrix):
    import gemmaquant.calib.imatrix as im

    calls = []
    real = im.compute_imatrix
    monkeypatch.setattr(im, "compute_imatrix", lambda *a, **k: calls.append(1) or real(*a, **k))
    opts = dict(imatrix=imatrix, calib_samples=2, calib_len=32)
    schemes = [get_scheme(n) for n in SET]
    out = run_quantize_set(ckpt, schemes, tmp_path / "set", QuantizeOptions(**opts))
    assert len(calls) == (1 if imatrix else 0)
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == sorted(default_output(ckpt, s).name for s in schemes)
    for s, summary in zip(schemes, out):
        assert summary.output == tmp_path / "set" / default_output(ckpt, s).name
        single = run_quantize(ckpt, s, tmp_path / "single.gguf", QuantizeOptions(**opts, force=True))
        assert summary.output.read_bytes() == single.output.read_bytes(), s.name


def test_refusals_come_before_any_file(ckpt, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    taken = d / default_output(ckpt, get_scheme("q4_k_m")).name
    taken.write_bytes(b"keep")
    with pytest.raises(OutputError, match="exists"):
        run_quantize_set(ckpt, [get_scheme(n) for n in SET], d, QuantizeOptions())
    assert [p.name for p in d.iterdir()] == [taken.name] and taken.read_bytes() == b"keep"
    with pytest.raises(GemmaQuantError, match="iq2_xxs: this quantization requires an imatrix"):
        run_quantize_set(ckpt, [get_scheme("q8_0"), get_scheme("iq2_xxs")], tmp_path / "b", QuantizeOptions())
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("schemes,out,match", [
    (["q8_0", "fp8"], "d", "GGUF presets only, not fp8"),
    (["q8_0", "q8_0"], "d", "q8_0 is listed twice"),
    (["q8_0", "q6_k"], "x.gguf", "several presets need a directory"),
])
def test_bad_sets_are_one_line_errors(ckpt, tmp_path, schemes, out, match):
    with pytest.raises(GemmaQuantError, match=match):
        run_quantize_set(ckpt, [get_scheme(n) for n in schemes], tmp_path / out, QuantizeOptions())
    assert not list(tmp_path.iterdir())


@pytest.mark.subprocess
def test_cli_writes_the_set_and_prints_each_summary(ckpt, tmp_path):
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gemmaquant.cli", "quantize", str(ckpt.path), "--scheme", "q8_0, Q4_0",
                        "--out", str(tmp_path / "gguf"), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [x["scheme"] for x in got] == ["q8_0", "q4_0"]
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["tiny-gemma3-256.Q4_0.gguf", "tiny-gemma3-256.Q8_0.gguf"]
    r = subprocess.run([sys.executable, "-m", "gemmaquant.cli", "quantize", str(ckpt.path), "--scheme", "q8_0,iq1_s",
                        "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "iq1_s: this quantization requires an imatrix" in r.stderr
    assert not (tmp_path / "b").exists()


def test_an_imatrix_without_a_very_low_bit_tensor_is_refused_before_writing(ckpt, tmp_path):
    """llama-quantize stops half-way through its file on this; we refuse before the first byte."""
    import torch

    from gemmaquant.export.gguf.writer import write_gguf

    with pytest.raises(GemmaQuantError, match=r"^im\.gguf: missing importance matrix for tensor 'blk\.0\.attn_k\.weight' "
                                              r"in a very low-bit quantization \(iq2_xxs makes it IQ2_XXS\)$"):
        write_gguf(ckpt, "iq2_xxs", tmp_path / "x.gguf", imatrix={"blk.0.attn_q.weight": torch.ones(256)},
                   imatrix_meta={"file": "im.gguf"})
    assert not list(tmp_path.iterdir())
