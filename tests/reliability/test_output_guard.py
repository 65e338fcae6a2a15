"""The one output guard (issue 15 §1) through the real CLI: every writer (GGUF, compressed-tensors, imatrix,
eval/compare reports) refuses an output that is, lies inside or contains an input, replaces a file only
with a file and a directory only when it is one of ours, and never leaves anything at or beside the path.

Each refusal must exit with its code and one `error:` line, leave every file under the test directory
as it was (same names, same sha256) and create nothing. In process (run_cli): the guard refuses before
any model is loaded, so the cases take milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from . import TINY_G3, check_error, digests, forbid_weight_loading, run_cli, tree, write_tiny

TINY_1L = {**TINY_G3, "num_hidden_layers": 1}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("guard") / "tiny"
    write_tiny(d, TINY_1L)
    return d


@pytest.fixture(scope="module")
def good_gguf(good):
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.gguf.writer import write_gguf

    out = good.parent / "good.Q8_0.gguf"
    write_gguf(Checkpoint(good), "q8_0", out)
    return out


def _model(tmp: Path, good: Path) -> Path:
    m = tmp / "m"
    shutil.copytree(good, m)
    return m


def _text(tmp: Path) -> Path:
    t = tmp / "t.txt"
    t.write_text("the cat sat on the mat. " * 200)
    return t


CASES: dict = {}


def case(name: str, code: int, match: str):
    def deco(fn):
        CASES[name] = (fn, code, match)
        return fn
    return deco


def _q(m, out, scheme="q8_0", *extra):
    return ["quantize", m, "--scheme", scheme, "-o", out, "--quiet", *extra]


# -- the source model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["q8_0", "fp8"])
def test_never_the_source(scheme, good, tmp_path, capsys):
    """--out M, M/model.safetensors, M's parent, M/../M and a symlink to M, with --force: all refused."""
    m = _model(tmp_path, good)
    (tmp_path / "unrelated.txt").write_text("keep")
    (tmp_path / "link").symlink_to(m)
    for out, match in ((m, "is an input"), (m / "model.safetensors", "lies inside the input"),
                       (tmp_path, "contains the input"), (m / ".." / "m", "is an input"),
                       (tmp_path / "link", "is an input"), (tmp_path / "link" / "x", "lies inside the input"),
                       (m / "sub" / "out", "lies inside the input")):
        before, sums = tree(tmp_path), digests(tmp_path)
        check_error(run_cli(_q(m, out, scheme, "--force"), capsys), 3, match)
        assert tree(tmp_path) == before and digests(tmp_path) == sums, out


# -- refusals table --------------------------------------------------------------------------------------
@case("empty --out, GGUF", 2, "--out: the path is empty")
def _(tmp, good, gg):
    return _q(_model(tmp, good), "", "q8_0", "--force")


@case("empty --out, compressed-tensors", 2, "--out: the path is empty")
def _(tmp, good, gg):
    return _q(_model(tmp, good), "", "fp8", "--force")


@case("empty imatrix --out", 2, "--out: the path is empty")
def _(tmp, good, gg):
    return ["imatrix", _model(tmp, good), "-o", "", "--force"]


@case("GGUF output onto a non-empty directory, --force", 3, "is a directory; a file output never replaces it")
def _(tmp, good, gg):
    (tmp / "d").mkdir()
    (tmp / "d" / "mine.txt").write_text("mine")
    return _q(_model(tmp, good), tmp / "d", "q8_0", "--force")


@case("GGUF output onto an empty directory, --force", 3, "is a directory; a file output never replaces it")
def _(tmp, good, gg):
    (tmp / "empty").mkdir()
    return _q(_model(tmp, good), tmp / "empty", "q8_0", "--force")


@case("compressed-tensors onto a directory that is not ours, --force", 3, "is not a gemmaquant output")
def _(tmp, good, gg):
    (tmp / "d").mkdir()
    (tmp / "d" / "mine.txt").write_text("mine")
    return _q(_model(tmp, good), tmp / "d", "fp8", "--force")


@case("compressed-tensors onto a file, --force", 3, "is a file; a directory output never replaces it")
def _(tmp, good, gg):
    (tmp / "f").write_text("mine")
    return _q(_model(tmp, good), tmp / "f", "fp8", "--force")


@case("output onto a FIFO, --force", 3, "is a FIFO (named pipe); a file output never replaces it")
def _(tmp, good, gg):
    os.mkfifo(tmp / "p")
    return _q(_model(tmp, good), tmp / "p", "q8_0", "--force")


@case("GGUF output onto the --imatrix-file", 3, "is an input of this command")
def _(tmp, good, gg):
    from gemmaquant.formats.gguf.imatrix import write_imatrix
    import torch

    write_imatrix(tmp / "im.gguf", {"blk.0.attn_q.weight": torch.ones(256)}, {"blk.0.attn_q.weight": 4},
                  datasets=["d"], chunk_count=1, chunk_size=4)
    return _q(_model(tmp, good), tmp / "im.gguf", "q4_k_m", "--force", "--imatrix-file", tmp / "im.gguf")


@case("output onto the --calib text", 3, "is an input of this command")
def _(tmp, good, gg):
    return _q(_model(tmp, good), _text(tmp), "q4_k_m", "--force", "--imatrix", "--calib", _text(tmp))


@case("output directory containing the --calib text", 3, "contains the input")
def _(tmp, good, gg):
    (tmp / "texts").mkdir()
    (tmp / "texts" / "c.txt").write_text("the cat sat on the mat. " * 50)
    return _q(_model(tmp, good), tmp / "texts", "w4a16", "--force", "--calib", tmp / "texts" / "c.txt")


@case("output onto the recipe file", 3, "is an input of this command")
def _(tmp, good, gg):
    (tmp / "r.toml").write_text('scheme = "q8_0"\n')
    return ["quantize", _model(tmp, good), "--recipe", tmp / "r.toml", "-o", tmp / "r.toml", "--force", "-q"]


@case("imatrix --out onto the model directory", 3, "is an input of this command")
def _(tmp, good, gg):
    m = _model(tmp, good)
    return ["imatrix", m, "-o", m, "--force", "--calib-samples", "1", "--calib-len", "8"]


@case("imatrix --out onto its --calib text", 3, "is an input of this command")
def _(tmp, good, gg):
    return ["imatrix", _model(tmp, good), "-o", _text(tmp), "--calib", _text(tmp), "--force"]


@case("eval --json onto the --text file", 3, "is an input of this command")
def _(tmp, good, gg):
    return ["eval", gg, "--text", _text(tmp), "--json", _text(tmp), "--ctx", "64", "-q"]


@case("eval --json onto the model file, --force", 3, "is an input of this command")
def _(tmp, good, gg):
    g = tmp / "g.gguf"
    shutil.copy(gg, g)
    return ["eval", g, "--text", _text(tmp), "--json", g, "--ctx", "64", "-q", "--force"]


@case("eval --json inside the model directory", 3, "lies inside the input")
def _(tmp, good, gg):
    m = _model(tmp, good)
    return ["eval", m, "--text", _text(tmp), "--json", m / "ppl.json", "--ctx", "64", "-q"]


@case("eval --json onto an existing file without --force", 3, "output file already exists (use --force")
def _(tmp, good, gg):
    (tmp / "r.json").write_text("an older report")
    return ["eval", gg, "--text", _text(tmp), "--json", tmp / "r.json", "--ctx", "64", "-q"]


@case("eval --json onto a directory", 3, "is a directory")
def _(tmp, good, gg):
    (tmp / "reports").mkdir()
    return ["eval", gg, "--text", _text(tmp), "--json", tmp / "reports", "--ctx", "64", "-q", "--force"]


@case("empty eval --json", 2, "--json: the path is empty")
def _(tmp, good, gg):
    return ["eval", gg, "--text", _text(tmp), "--json", "", "--ctx", "64", "-q"]


@case("compare --markdown onto an artifact", 3, "is an input of this command")
def _(tmp, good, gg):
    g = tmp / "g.gguf"
    shutil.copy(gg, g)
    return ["compare", _model(tmp, good), g, "--text", _text(tmp), "--markdown", g, "--ctx", "64", "-q", "--force"]


@case("compare --plot onto the --text file", 3, "is an input of this command")
def _(tmp, good, gg):
    pytest.importorskip("matplotlib")
    t = tmp / "t.png"
    t.write_text("the cat sat on the mat. " * 200)
    return ["compare", _model(tmp, good), gg, "--text", t, "--plot", t, "--ctx", "64", "-q", "--force"]


@case("compare --json inside the base directory", 3, "lies inside the input")
def _(tmp, good, gg):
    m = _model(tmp, good)
    return ["compare", m, gg, "--text", _text(tmp), "--json", m / "r.json", "--ctx", "64", "-q"]


@case("compare --json and --markdown to one file", 2, "given to both --json and --markdown")
def _(tmp, good, gg):
    return ["compare", _model(tmp, good), gg, "--text", _text(tmp), "--json", tmp / "r", "--markdown", tmp / "r",
            "--ctx", "64", "-q"]


@case("compare --plot with an extension matplotlib cannot write", 2, "must end in an image format")
def _(tmp, good, gg):
    pytest.importorskip("matplotlib")
    return ["compare", _model(tmp, good), gg, "--text", _text(tmp), "--plot", tmp / "p.docx", "--ctx", "64", "-q"]


@pytest.mark.parametrize("name", list(CASES))
def test_refused(name, good, good_gguf, tmp_path, capsys, monkeypatch):
    """Refused before any model is loaded: nothing at or beside the output, every input unchanged."""
    fn, code, match = CASES[name]
    args = fn(tmp_path, good, good_gguf)
    before, sums, gsum = tree(tmp_path), digests(tmp_path), digests(good_gguf)
    forbid_weight_loading(monkeypatch)
    check_error(run_cli(args, capsys), code, match)
    assert tree(tmp_path) == before and digests(tmp_path) == sums and digests(good_gguf) == gsum


# -- what --force does replace ---------------------------------------------------------------------------
def test_force_replaces_a_file_with_a_file(good, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    out.write_text("an older output")
    check_error(run_cli(_q(good, out), capsys), 3, "output file already exists (use --force to replace it)")
    assert out.read_text() == "an older output"
    assert run_cli(_q(good, out, "q8_0", "--force"), capsys).code == 0
    assert out.read_bytes()[:4] == b"GGUF" and tree(tmp_path) == ["x.gguf"]


def test_force_replaces_only_our_own_directory(good, tmp_path, capsys):
    out = tmp_path / "x-FP8"
    assert run_cli(_q(good, out, "fp8"), capsys).code == 0
    marker = json.loads((out / "gemmaquant.json").read_text())
    assert marker["written_by"] == "gemmaquant" and marker["files"] == sorted(p.name for p in out.iterdir())
    check_error(run_cli(_q(good, out, "fp8"), capsys), 3, "already exists (use --force to replace it)")
    assert run_cli(_q(good, out, "int8-w8a16", "--force"), capsys).code == 0
    assert json.loads((out / "gemmaquant.json").read_text())["scheme"] == "int8-w8a16"
    (out / "notes.md").write_text("mine")  # a file gemmaquant did not write: no longer ours to delete
    sums = digests(out)
    check_error(run_cli(_q(good, out, "fp8", "--force"), capsys), 3, "holds 'notes.md', which gemmaquant did not write")
    assert digests(out) == sums and sorted(tree(tmp_path)) == sorted(["x-FP8"] + [f"x-FP8/{n}" for n in marker["files"]]
                                                                      + ["x-FP8/notes.md"])


def test_report_force_replaces_a_report(good_gguf, tmp_path, capsys):
    t = _text(tmp_path)
    r = tmp_path / "r.json"
    r.write_text("old")
    res = run_cli(["eval", good_gguf, "--text", t, "--json", r, "--ctx", "64", "--chunks", "2", "-q", "--force"], capsys)
    assert res.code == 0, res.stderr
    assert json.loads(r.read_text())["chunks"] == 2 and tree(tmp_path) == ["r.json", "t.txt"]


def test_an_empty_directory_is_replaced_by_a_directory(good, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert run_cli(_q(good, tmp_path / "out", "fp8"), capsys).code == 0
    assert (tmp_path / "out" / "gemmaquant.json").is_file()
