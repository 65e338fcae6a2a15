"""Hub-ready model cards: front matter by the Hub's conventions for quantized models, a GGUF folder card
that lists every file written into it, `compare --card` writing measured drift into a card, and a
README.md that is not ours left alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemmaquant.export.model_card import (add_drift, add_output, base_model_of, new_card, read_card, render_card,
                                          source_license)
from gemmaquant.formats.hub import front_matter
from gemmaquant.formats.texts import eval_text
from tests.reliability import TINY_G3, run_cli, tree, write_tiny

TINY_1L = {**TINY_G3, "num_hidden_layers": 1}


def _card(d: Path, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "README.md").write_text(text)
    return d


def test_front_matter_subset():
    fm = front_matter('---\nlicense: gemma\nbase_model:\n- google/gemma-3-270m\ntags:\n- a\n- "b"\n'
                      'extra_gated_prompt: >-\n  folded text\n  more\n---\n# body\nlicense: not this\n')
    assert fm == {"license": "gemma", "base_model": ["google/gemma-3-270m"], "tags": ["a", "b"],
                  "extra_gated_prompt": ">-"}
    assert front_matter("# no front matter\n") == {}


def test_base_model_is_known_or_left_out(tmp_path):
    plain = _card(tmp_path / "plain", "# my model\n")
    assert base_model_of("google/gemma-2-2b-it", plain, {}) == "google/gemma-2-2b-it"  # typed as a repo id
    assert base_model_of(str(plain), plain, {}) is None
    snap = tmp_path / "hub" / "models--google--gemma-2-9b-it" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    assert base_model_of(str(snap), snap, {}) == "google/gemma-2-9b-it"  # a Hugging Face cache snapshot
    assert base_model_of(str(plain), plain, {"_name_or_path": "google/gemma-7b"}) == "google/gemma-7b"
    assert base_model_of(str(plain), plain, {"_name_or_path": "/tmp/x/y"}) is None
    quantized = _card(tmp_path / "q", "---\nbase_model: google/gemma-3-270m\nbase_model_relation: quantized\n---\n")
    assert base_model_of(str(quantized), quantized, {}) == "google/gemma-3-270m"
    # A fine-tune's card names the model it was trained from: our output is not a quantization of that one.
    tuned = _card(tmp_path / "ft", "---\nbase_model: google/gemma-3-270m\nlicense: gemma\n---\n")
    assert base_model_of(str(tuned), tuned, {}) is None


def test_licence_from_the_source_card_else_the_family(tmp_path):
    assert source_license(_card(tmp_path / "a", "---\nlicense: apache-2.0\n---\n"), "gemma3_text") == "apache-2.0"
    assert source_license(tmp_path / "none", "gemma2") == "gemma"
    assert source_license(tmp_path / "none", "gemma4_text") == "apache-2.0"


def test_card_round_trip_and_drift_replacement():
    card = new_card(fmt="gguf", title="m-GGUF", base_model="google/gemma-3-270m", source="demo", license="gemma",
                    tags=["gguf"])
    add_output(card, {"file": "m.Q8_0.gguf", "scheme": "q8_0", "summary": "8-bit", "command": "gemmaquant quantize --x",
                      "bytes": 3_000_000, "bits_per_weight": 8.5, "types": {"Q8_0": 3}})
    m = {"base": "demo", "text": "built-in:default_eval.txt", "text_sha256": "ab" * 32, "ctx": 512, "chunks": 4,
         "dtype": "float32", "base_ppl": 10.0, "ppl": 10.1, "delta_ppl_pct": 1.0, "kl_mean": 0.01, "kl_p99": 0.1,
         "top1": 0.95}
    assert add_drift(card, "m.Q8_0.gguf", m) and add_drift(card, "m.Q8_0.gguf", {**m, "ppl": 10.2})
    assert not add_drift(card, "other.gguf", m)
    text = render_card(card)
    assert text.startswith('---\nbase_model: "google/gemma-3-270m"\nbase_model_relation: quantized\n'
                           'quantized_by: gemmaquant\nlicense: "gemma"\nlibrary_name: gguf\n')
    assert "| `m.Q8_0.gguf` | demo | `built-in:default_eval.txt` (sha256 `abababababab`) | 4×512 |" in text
    assert "10.2000" in text and "10.1000" not in text  # same text, ctx, chunks: replaced, not appended
    assert "--x" not in text.split("<!-- gemmaquant-card")[1]  # "--" cannot end the data comment early
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "README.md"
        p.write_text(text)
        assert read_card(p) == json.loads(json.dumps(card))
        p.write_text("# someone else's card\n")
        assert read_card(p) is None


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("card") / "tiny"
    write_tiny(d, TINY_1L, seed=3)
    (d / "README.md").write_text("---\nlicense: gemma\n---\n# a tiny Gemma\n")
    return d


def test_gguf_folder_card_lists_each_file_and_takes_the_drift(src, tmp_path, capsys):
    out = tmp_path / "repo"
    for scheme in ("q8_0", "q4_k_m"):
        res = run_cli(["quantize", src, "--scheme", scheme, "-o", out / f"tiny.{scheme}.gguf", "--card", "--quiet",
                       "--base-model", "google/gemma-3-1b-pt"], capsys)
        assert res.code == 0, res.stderr
    readme = out / "README.md"
    text = readme.read_text()
    front = front_matter(text)
    assert front["base_model"] == "google/gemma-3-1b-pt" and front["base_model_relation"] == "quantized"
    assert front["quantized_by"] == "gemmaquant" and front["license"] == "gemma" and front["library_name"] == "gguf"
    assert "| `tiny.q4_k_m.gguf` | `q4_k_m`" in text and "| `tiny.q8_0.gguf` | `q8_0`" in text
    assert "Not measured yet" in text

    res = run_cli(["compare", src, out / "tiny.q8_0.gguf", "--card", "--ctx", "64", "--chunks", "2", "--quiet"], capsys)
    assert res.code == 0, res.stderr
    card = read_card(readme)
    drift = {o["file"]: o["drift"] for o in card["outputs"]}
    assert drift["tiny.q4_k_m.gguf"] == [] and len(drift["tiny.q8_0.gguf"]) == 1
    d = drift["tiny.q8_0.gguf"][0]
    assert (d["text"], d["text_sha256"]) == ("built-in:default_eval.txt", eval_text().sha256)
    assert (d["ctx"], d["chunks"]) == (64, 2) and 0 <= d["kl_mean"] < 0.05 and d["top1"] > 0.8
    assert "| `tiny.q8_0.gguf` | tiny | `built-in:default_eval.txt`" in readme.read_text()


def test_a_readme_that_is_not_ours_is_never_replaced(src, tmp_path, capsys):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    res = run_cli(["quantize", src, "--scheme", "q8_0", "-o", out / "t.gguf", "--card", "--force", "--quiet"], capsys)
    assert res.code == 3 and "is not a gemmaquant model card" in res.stderr
    assert tree(out) == ["README.md"] and (out / "README.md").read_text() == "# my notes\n"
    # and `compare --card` on a GGUF without a card of ours says how to get one, before measuring anything
    res = run_cli(["quantize", src, "--scheme", "q8_0", "-o", out / "t.gguf", "--quiet"], capsys)
    assert res.code == 0, res.stderr
    res = run_cli(["compare", src, out / "t.gguf", "--card", "--ctx", "64", "--chunks", "2"], capsys)
    assert res.code == 2 and "no gemmaquant model card" in res.stderr and "--card" in res.stderr
    assert (out / "README.md").read_text() == "# my notes\n"


def test_a_card_is_not_also_a_report(src, tmp_path, capsys):
    """compare refuses one file for two outputs: a --markdown/--json/--plot path that is a card --card
    rewrites fails before measuring, --force or not, and the card is left as it was."""
    out = tmp_path / "repo"
    assert run_cli(["quantize", src, "--scheme", "q8_0", "-o", out / "t.gguf", "--card", "--quiet"], capsys).code == 0
    before = (out / "README.md").read_bytes()
    res = run_cli(["compare", src, out / "t.gguf", "--card", "--markdown", out / "README.md", "--force", "--ctx", "64",
                   "--chunks", "2"], capsys)
    assert res.code == 2 and "given to both --card and --markdown" in res.stderr
    assert (out / "README.md").read_bytes() == before and tree(out) == ["README.md", "t.gguf"]


def test_compressed_tensors_card_takes_the_drift_too(src, tmp_path, capsys):
    out = tmp_path / "fp8"
    assert run_cli(["quantize", src, "--scheme", "fp8", "-o", out, "--quiet"], capsys).code == 0
    front = front_matter((out / "README.md").read_text())
    assert front["quantized_by"] == "gemmaquant" and front["license"] == "gemma" and "base_model" not in front
    res = run_cli(["compare", src, "--card", out, "--ctx", "64", "--chunks", "2", "--quiet"], capsys)
    assert res.code == 0, res.stderr
    text = (out / "README.md").read_text()
    assert "| tiny-FP8-dynamic | tiny | `built-in:default_eval.txt`" in text
    assert read_card(out / "README.md")["outputs"][0]["drift"][0]["ctx"] == 64


def test_bad_base_model_is_refused(src, tmp_path, capsys):
    res = run_cli(["quantize", src, "--scheme", "q8_0", "-o", tmp_path / "t.gguf", "--base-model", "not a repo"], capsys)
    assert res.code == 2 and "--base-model 'not a repo'" in res.stderr
    assert tree(tmp_path) == []


def test_card_names_the_calibration_text(src, tmp_path, capsys):
    from gemmaquant.calib.data import calib_text

    out = tmp_path / "static"
    res = run_cli(["quantize", src, "--scheme", "fp8-static", "-o", out, "--calib-samples", "2", "--calib-len", "32",
                   "--quiet"], capsys)
    assert res.code == 0, res.stderr
    assert f"2 samples × 32 tokens of `built-in:default_calib.txt (sha256 {calib_text().sha256[:12]})`" \
        in (out / "README.md").read_text()
