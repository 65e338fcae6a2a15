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
    return Checkpoint(ref.random_gemma3_256(tmp_path_factory.mktemp("set") / "tiny-gemma3-256"))


@pytest.mark.slow  # a set and each preset alone, an imatrix pass for some: ~10 s each
@pytest.mark.parametrize("names,imatrix", [
    (SET, False), (SET, True),
    (["q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q8_0"], False),  # most tensors' types shared
    (["q4_k_m", "iq2_xxs", "q2_k_s"], True),  # presets refused without an imatrix
])
def test_each_file_is_the_single_preset_file(ckpt, tmp_path, monkeypatch, names, imatrix):
    import gemmaquant.calib.imatrix as im
    from gemmaquant.export.gguf import writer

    calls, passes = [], []
    real, real_set = im.compute_imatrix, writer.write_gguf_set
    monkeypatch.setattr(im, "compute_imatrix", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(writer, "write_gguf_set", lambda ck, outs, **k: passes.append(len(outs)) or real_set(ck, outs, **k))
    opts = dict(imatrix=imatrix, calib_samples=2, calib_len=32)
    schemes = [get_scheme(n) for n in names]
    out = run_quantize_set(ckpt, schemes, tmp_path / "set", QuantizeOptions(**opts))
    assert len(calls) == (1 if imatrix else 0)
    assert passes == [len(names)]  # one pass writes them all
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == sorted(default_output(ckpt, s).name for s in schemes)
    for s, summary in zip(schemes, out):
        assert summary.output == tmp_path / "set" / default_output(ckpt, s).name
        single = run_quantize(ckpt, s, tmp_path / "single.gguf", QuantizeOptions(**opts, force=True))
        assert summary.output.read_bytes() == single.output.read_bytes(), s.name
        assert summary.output_bytes == single.output_bytes and summary.types == single.types
        assert summary.notes[:len(single.notes)] == single.notes  # plus the note on the shared pass


def test_the_source_is_read_once_for_the_whole_set(ckpt, tmp_path, monkeypatch):
    from collections import Counter

    monkeypatch.setenv("GEMMAQUANT_GGUF_WORKERS", "threads")  # every read in this process, where it is counted
    reads = Counter()
    real = Checkpoint.tensor
    monkeypatch.setattr(Checkpoint, "tensor", lambda self, name: reads.update([name]) or real(self, name))
    run_quantize_set(ckpt, [get_scheme(n) for n in ["q8_0", "q6_k", "q4_k_m", "bf16"]], tmp_path / "set",
                     QuantizeOptions())
    assert set(reads) == set(ckpt.names()) and set(reads.values()) == {1}


def test_one_card_lists_every_file_of_the_set(ckpt, tmp_path, monkeypatch):
    from gemmaquant.export import model_card

    writes = []
    real = model_card.write_card
    monkeypatch.setattr(model_card, "write_card", lambda *a, **k: writes.append(1) or real(*a, **k))
    names = ["q8_0", "q4_k_m", "q2_k"]
    out = run_quantize_set(ckpt, [get_scheme(n) for n in names], tmp_path / "set",
                           QuantizeOptions(card=True, command="gemmaquant quantize m --scheme q8_0,q4_k_m,q2_k"))
    assert writes == [1]
    card = model_card.read_card(tmp_path / "set" / "README.md")
    assert [(o["file"], o["scheme"], o["bytes"]) for o in card["outputs"]] == \
        sorted((s.output.name, s.scheme, s.output.stat().st_size) for s in out)
    text = (tmp_path / "set" / "README.md").read_text()
    for s in out:  # the files table: name, size and bits per weight of each
        row = next(line for line in text.splitlines() if line.startswith(f"| `{s.output.name}` |"))
        assert f"| {s.bits_per_weight:.2f} |" in row and f"`{s.scheme}`" in row


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
