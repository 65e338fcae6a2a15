"""Which text a measurement was made on: `eval` and `compare` default to the shipped evaluation text,
`imatrix` to the calibration text, and every output names the text and its sha256."""

from __future__ import annotations

import hashlib
import json

import pytest

from gemmaquant.calib.data import calib_text
from gemmaquant.formats.texts import eval_text
from tests.reliability import TINY_G3, run_cli, write_tiny


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts") / "tiny"
    write_tiny(d, {**TINY_G3, "num_hidden_layers": 1}, seed=2)
    return d


def test_eval_names_the_builtin_text_and_a_given_one(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    res = run_cli(["eval", src, "--ctx", "64", "--chunks", "2"], capsys)
    assert res.code == 0, res.stderr
    assert f"built-in:default_eval.txt (sha256 {eval_text().sha256[:12]})" in res.stdout
    mine = tmp_path / "mine.txt"
    mine.write_text("The harbour master counted the boats twice every morning. " * 60)
    res = run_cli(["eval", src, "--text", mine, "--ctx", "64", "--chunks", "2", "--json", "-"], capsys)
    data = json.loads(res.stdout)
    assert data["text"] == str(mine) and data["text_sha256"] == hashlib.sha256(mine.read_bytes()).hexdigest()


def test_imatrix_defaults_to_the_calibration_text(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    res = run_cli(["imatrix", src, "-o", tmp_path / "a.gguf", "--calib-samples", "2", "--calib-len", "32"], capsys)
    assert res.code == 0, res.stderr
    assert f"text built-in:default_calib.txt (sha256 {calib_text().sha256[:12]})" in res.stdout
    mine = tmp_path / "mine.txt"
    mine.write_text("Plain sentences about the weather, the sea and a small town market. " * 40)
    res = run_cli(["imatrix", src, "-o", tmp_path / "b.gguf", "--text", mine, "--calib-samples", "2",
                   "--calib-len", "32"], capsys)  # --text is --calib's other name
    assert res.code == 0, res.stderr
    assert f"text {mine} (sha256 {calib_text(mine).sha256[:12]})" in res.stdout
