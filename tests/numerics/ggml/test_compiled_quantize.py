"""The torch.compile'd quantizers (`numerics/ggml/compiled_quantize.py`, with the native C searches
that it prefers turned off here: test_native_search.py checks those) against llama.cpp's own C
quantizer (libggml's ggml_quantize_chunk), with any fallback to the plain path made an error (a
silent fallback would pass while the compiled searches were wrong); and the fallback itself, when a
compiled search fails or its bytes differ (fast: nothing is compiled there)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from gemmaquant.numerics import compiling
from gemmaquant.numerics.ggml import compiled_quantize, native, registry, search
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.types import GGMLType
from tests.numerics.ggml.family_checks import demo_rows, random_rows
from tests.numerics.ggml.libggml import ggml_quantize, require_libggml
from tests.numerics.ggml.test_quantize import assert_same_blocks, imatrix

# (type, with an imatrix): the searches of the common presets. Q4_1 with an imatrix runs the same
# make_qkx3 graph as Q4_K (no new compile); Q4_0 with one make_qx_quants with weights and nmax 8 (Q5_0's
# nmax 16 is the same code with another constant: one compile of 30-200 s saved).
CASES = [(GGMLType.Q6_K, False), (GGMLType.Q6_K, True), (GGMLType.Q4_K, False), (GGMLType.Q4_K, True),
         (GGMLType.Q5_K, False), (GGMLType.Q5_K, True), (GGMLType.Q4_0, True), (GGMLType.Q4_1, True)]  # fmt: skip
DEMO = ["model.layers.0.mlp.down_proj.weight", "model.layers.9.self_attn.o_proj.weight"]
# Cold-cache compiles take 30-220 s each: the default suite checks the two cheapest searches (make_qx_quants
# with weights, Q6_K's make_qx/make_qp) and GEMMAQUANT_COMPILE_TESTS=1 runs every case.
EVERY = os.environ.get("GEMMAQUANT_COMPILE_TESTS") == "1"
DEFAULT = [(GGMLType.Q6_K, False), (GGMLType.Q4_0, True)]


def gated(cases):
    skip = pytest.mark.skip(reason="set GEMMAQUANT_COMPILE_TESTS=1 for every compiled search (minutes of compiling)")
    return [pytest.param(*c) if EVERY or c in DEFAULT else pytest.param(*c, marks=skip) for c in cases]


@pytest.fixture(autouse=True)
def no_native(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(native.ENV, "0")


def strict_compiled(w: torch.Tensor, qtype: GGMLType, im: torch.Tensor | None) -> torch.Tensor:
    """quantize(compiled=True), failing where the compiled searches are not what ran."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiling.CompiledDequantWarning)
        got = quantize(w, qtype, im, compiled=True)
    assert (qtype, im is not None) in compiled_quantize._checked
    assert f"quantize {qtype.name}" in compiling.compiled_types()
    return got


def test_search_types_are_flagged() -> None:
    flagged = {t for t, k in registry.TYPES.items() if k.compiled_search}
    assert flagged == {GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q4_0, GGMLType.Q4_1,
                       GGMLType.Q5_0, GGMLType.Q5_1}  # fmt: skip


@pytest.mark.subprocess  # compiles C++ (tens of seconds per search the first time; inductor caches it)
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype,with_imatrix", gated(CASES), ids=lambda c: getattr(c, "name", str(c)))
def test_compiled_bytes_equal_libggml(qtype: GGMLType, with_imatrix: bool, one_thread) -> None:
    require_libggml()
    for seed, n in ((0, 1024), (1, 256)):
        w = random_rows(12, n, seed=seed)  # outliers, zero/constant/tiny rows, ties, tiny sub-blocks
        w[3, 5::61] = 3.0
        im = imatrix(n, seed=seed + 7) if with_imatrix else None
        assert_same_blocks(strict_compiled(w, qtype, im), ggml_quantize(w, qtype, im), qtype)


@pytest.mark.subprocess
@pytest.mark.llamacpp
@pytest.mark.demo
@pytest.mark.parametrize("qtype,with_imatrix", gated(CASES[:6]), ids=lambda c: getattr(c, "name", str(c)))
def test_compiled_demo_tensors(demo_dir: Path, qtype: GGMLType, with_imatrix: bool, one_thread) -> None:
    require_libggml()
    for name in DEMO:
        w = demo_rows(demo_dir, name, 96)
        im = imatrix(w.shape[1], seed=3) if with_imatrix else None
        assert_same_blocks(strict_compiled(w, qtype, im), ggml_quantize(w, qtype, im), qtype)


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch):
    """compiled_quantize's per-process state, emptied for one test and restored after it."""
    monkeypatch.setattr(compiled_quantize, "_off", {})
    monkeypatch.setattr(compiled_quantize, "_checked", set())
    monkeypatch.setattr(compiled_quantize, "_searches", {})
    return monkeypatch


def _fake_searches(fresh: pytest.MonkeyPatch, make_qx_quants) -> None:
    table = {name: getattr(search, name) for name in compiled_quantize.SEARCHES}
    table["make_qx_quants"] = make_qx_quants
    fresh.setattr(compiled_quantize, "_searches", table)


def test_fallback_when_bytes_differ(fresh: pytest.MonkeyPatch) -> None:
    def wrong_scale(x, nmax, qw):  # a compiled search gone wrong (one ulp rarely survives the fp16 rounding)
        token = search.COMPILED.set(None)  # the plain search, not this fake again
        try:
            scale, L = search.make_qx_quants(x, nmax, qw)
        finally:
            search.COMPILED.reset(token)
        return scale * 1.25, L

    _fake_searches(fresh, wrong_scale)
    w = torch.randn(8, 512) * 0.02
    with pytest.warns(compiling.CompiledDequantWarning, match="Q6_K quantizer turned off.*differs"):
        got = quantize(w, GGMLType.Q6_K, compiled=True)
    assert torch.equal(got, quantize(w, GGMLType.Q6_K, compiled=False))
    assert GGMLType.Q6_K in compiled_quantize._off
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(quantize(w, GGMLType.Q6_K, compiled=True), got)  # off: plain, no new warning


def test_fallback_when_compiling_fails(fresh: pytest.MonkeyPatch) -> None:
    def broken(x, nmax, qw):
        raise RuntimeError("InductorError: no C++ compiler\nmore detail")

    _fake_searches(fresh, broken)
    w = torch.randn(8, 512) * 0.02
    with pytest.warns(compiling.CompiledDequantWarning, match=r"Q6_K quantizer turned off \(RuntimeError: InductorError"):
        got = quantize(w, GGMLType.Q6_K, compiled=True)
    assert torch.equal(got, quantize(w, GGMLType.Q6_K, compiled=False))


def test_types_without_a_search_run_plain(fresh: pytest.MonkeyPatch) -> None:
    # Q4_0 without an imatrix (ggml's reference path) and Q8_0 search nothing: no compile, no claim.
    w = torch.randn(4, 256) * 0.02
    for qtype in (GGMLType.Q4_0, GGMLType.Q8_0):
        assert torch.equal(quantize(w, qtype, compiled=True), quantize(w, qtype, compiled=False))
    assert not compiled_quantize._checked
