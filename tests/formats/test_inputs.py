"""gemmaquant/formats/inputs.py: texts are read in pieces whose concatenation is the file, tokenized piece by
piece to the same ids as the whole text, and only as far as needed; a text is never read past the cap."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemmaquant.formats import inputs
from gemmaquant.errors import GemmaQuantError

from ..reliability import TINY_G3, check_error, run_cli, write_tiny

TINY_1L = {**TINY_G3, "num_hidden_layers": 1}


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n\t\u00e9\u4e66")), min_size=1, max_size=400),
       st.integers(4, 40))
def test_pieces_concatenate_to_the_text(tmp_path_factory, text, piece):
    p = tmp_path_factory.mktemp("t") / "t.txt"
    p.write_bytes(text.encode("utf-8"))
    if text.isspace():
        with pytest.raises(GemmaQuantError, match="the text file is empty"):
            list(inputs.text_pieces(p, "--text", piece=piece))
        return
    parts = list(inputs.text_pieces(p, "--text", piece=piece))
    assert "".join(parts) == text
    for prev, part in zip(parts, parts[1:]):  # every cut is after a newline before a non-blank, before a
        # space, or forced (no such place in 4 pieces' worth: a cut after exactly `piece` characters)
        assert not part[0].isspace() or part[0] == " " or len(prev) == piece, (prev, part)


def test_cuts_keep_newline_runs_whole(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("alpha\n\n\nbeta gamma\n\ndelta\n" * 50)
    for part in inputs.text_pieces(p, "--text", piece=16):
        assert not part.startswith("\n")


def test_reading_stops_once_enough_tokens_are_there(tmp_path):
    """A NUL byte far into the file is never reached when the tokens needed come first."""
    p = tmp_path / "t.txt"
    p.write_bytes(b"one two three four\n" * 200_000 + b"\x00")  # 3.8 MB, then binary
    got = inputs.encode_text(p, "--text", lambda t: t.split(), need=1000)
    assert got.read.stopped and len(got.ids) >= 1000 and got.read.bytes_read <= 2 * inputs.PIECE_CHARS
    with pytest.raises(GemmaQuantError, match=r"looks binary \(NUL byte at offset 3800000\)"):
        inputs.encode_text(p, "--text", lambda t: t.split())


def test_the_cap_is_said(tmp_path, caplog):
    p = tmp_path / "t.txt"
    p.write_bytes(b"word " * 100_000)
    got = inputs.encode_text(p, "--text", lambda t: t.split(), cap=65536)
    assert got.read.capped and got.read.bytes_read == 65536 and len(got.ids) <= 65536 // 5 + 1
    assert "read only the first 64 KiB of its 488.3 KiB" in caplog.text


@pytest.mark.parametrize("data,match", [(b"caf\xe9 au lait", r"invalid byte at offset 3"), (b"\xe4\xb9", "ends inside"),
                                        (b" \n\t", "empty"), (b"ab\x00", "NUL byte at offset 2")])
def test_bad_texts_name_the_offset(tmp_path, data, match):
    p = tmp_path / "t.txt"
    p.write_bytes(data)
    with pytest.raises(GemmaQuantError, match=match):
        list(inputs.text_pieces(p, "--text"))


def test_json_reader(tmp_path):
    p = tmp_path / "c.json"
    for text, match in (('{"a": ' * 5000 + "1" + "}" * 5000, "nested too deeply"), ("[1]", "expected a JSON object"),
                        ('{"a": 1' + "0" * 5000 + "}", "not valid JSON"), ("\xff", "not valid JSON")):
        p.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff" else b"\xff")
        with pytest.raises(GemmaQuantError, match=match):
            inputs.read_json(p, "c.json")
    p.write_text(json.dumps({"a": 1}))
    assert inputs.read_json(p) == {"a": 1}
    with pytest.raises(GemmaQuantError, match="larger than the 4 bytes a c.json may have"):
        inputs.read_json(p, "c.json", limit=4)


# -- through the CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs") / "tiny"
    write_tiny(d, TINY_1L)
    return d


def test_eval_reads_only_what_its_chunks_need(tiny, tmp_path, capsys, monkeypatch):
    """eval --chunks 1 on a long text succeeds without reaching its binary tail; all chunks do reach it.
    (Pieces of 4 KiB instead of 1 MiB keep the test fast; the logic is the same.)"""
    monkeypatch.setattr(inputs, "PIECE_CHARS", 4096)
    t = tmp_path / "t.txt"
    t.write_bytes(b"the cat sat on the mat.\n" * 4000 + b"\x00")  # 96 kB, then binary
    res = run_cli(["eval", tiny, "--text", t, "--ctx", "64", "--chunks", "1", "--json", "-", "-q"], capsys)
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["chunks"] == 1
    check_error(run_cli(["eval", tiny, "--text", t, "--ctx", "64", "-q"], capsys), 2,
                "looks binary (NUL byte at offset 96000)")


def test_calibration_reads_only_what_its_samples_need(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inputs, "PIECE_CHARS", 4096)
    c = tmp_path / "c.txt"
    c.write_bytes(b"the cat sat on the mat.\n" * 4000 + b"\x00")
    res = run_cli(["imatrix", tiny, "-o", tmp_path / "im.gguf", "--calib", c, "--calib-samples", "1",
                   "--calib-len", "16"], capsys)
    assert res.code == 0, res.stderr
    res = run_cli(["imatrix", tiny, "-o", tmp_path / "im2.gguf", "--calib", c, "--calib-samples", "1",
                   "--calib-len", "16", "--llama-chunks"], capsys)
    assert res.code == 0, res.stderr


def test_eval_says_when_a_text_is_cut_at_the_cap(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inputs, "TEXT_CAP_BYTES", 4096)
    t = tmp_path / "t.txt"
    t.write_bytes(b"the cat sat on the mat.\n" * 2000)  # 48000 bytes
    res = run_cli(["eval", tiny, "--text", t, "--ctx", "64", "--json", "-", "-q"], capsys)
    assert res.code == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("note:") and "read only the first 4 KiB of its 46.9 KiB" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("parse_special", [False, True])
def test_gemma_tokenizer_gives_the_same_ids_piece_by_piece(demo_dir, tmp_path, parse_special):
    """The reason pieces end after a newline before a non-blank: Gemma's tokenizer matches newline runs
    as whole added tokens, so piece by piece equals whole-text tokenization (built-in calibration text:
    chat turns, code, eight languages, tables), even with 200-character pieces."""
    from gemmaquant.calib.data import default_text
    from gemmaquant.formats.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_dir)
    text = default_text()
    p = tmp_path / "t.txt"
    p.write_text(text, encoding="utf-8")
    whole = tok.encode(text, add_bos=False, parse_special=parse_special)
    pieces = list(inputs.text_pieces(p, "--text", piece=200))
    assert len(pieces) > 100
    ids, _ = inputs.encode_pieces(iter(pieces), lambda t: tok.encode(t, add_bos=False, parse_special=parse_special))
    assert ids == whole
