"""The quantize summary's notes: a calibrated 4-bit scheme on the built-in text tells the user that
--calib with their own kind of text matters (benchmarks/RESULTS.md, "what the calibration text is worth")."""

from __future__ import annotations

import json

import pytest

from gemmaquant.pipeline import CALIB_HINT

from .reliability import TINY_G3, run_cli, write_tiny

CALIB = ["--calib-samples", "2", "--calib-len", "32"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("notes") / "tiny"
    write_tiny(d, {**TINY_G3, "num_hidden_layers": 1}, seed=5)
    return d


def _notes(src, tmp_path, capsys, scheme, extra) -> list[str]:
    res = run_cli(["quantize", src, "--scheme", scheme, "-o", tmp_path / scheme, "--json", "--quiet",
                   *CALIB, *extra], capsys)
    assert res.code == 0, res.stderr
    return json.loads(res.stdout)["notes"]


@pytest.mark.parametrize("scheme,hint", [("w4a16", True), ("w4a16-asym", True), ("fp8-static", False)])
def test_hint_only_for_4bit_on_the_builtin_text(src, tmp_path, capsys, scheme, hint):
    assert (CALIB_HINT in _notes(src, tmp_path, capsys, scheme, [])) is hint


def test_no_hint_with_own_calibration_text(src, tmp_path, capsys):
    text = tmp_path / "mine.txt"
    text.write_text("Plain sentences about the weather, the sea and a small town market. " * 40)
    assert CALIB_HINT not in _notes(src, tmp_path, capsys, "w4a16", ["--calib", text])
