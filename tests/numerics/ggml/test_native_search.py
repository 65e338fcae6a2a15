"""The native C quantizers (`numerics/ggml/native.py`: the searches of `native/search.c`, the whole
quantizers of `native/kquants.c`, `lowk.c`, `iq4.c`) against llama.cpp's own C quantizer (libggml's
ggml_quantize_chunk), with any fallback made an error (a silent fallback would pass while the
native code was wrong), at this CPU's ISA level and at the baseline one;
and the fallbacks: no C compiler, a failed build, bytes that differ (fast: nothing is built there).
Skips where no C compiler exists."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from gemmaquant.numerics import compiling
from gemmaquant.numerics.ggml import compiled_quantize, iq4, native, search
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.types import GGMLType
from tests.numerics.ggml.family_checks import demo_rows, random_rows
from tests.numerics.ggml.libggml import ggml_quantize, require_libggml
from tests.numerics.ggml.test_quantize import assert_same_blocks, imatrix

# (type, with an imatrix): every quantizer that runs native, whole (Q3_K-Q6_K, IQ4_NL, IQ4_XS) or its
# searches only (Q4_0/Q5_0/Q4_1/Q5_1 search only with an imatrix: make_qx_quants with weights, make_qkx3;
# Q2_K).
CASES = [(GGMLType.Q4_K, False), (GGMLType.Q4_K, True), (GGMLType.Q6_K, False), (GGMLType.Q6_K, True),
         (GGMLType.Q5_K, False), (GGMLType.Q5_K, True), (GGMLType.Q4_0, True), (GGMLType.Q5_0, True),
         (GGMLType.Q4_1, True), (GGMLType.Q5_1, True), (GGMLType.Q2_K, False), (GGMLType.Q2_K, True),
         (GGMLType.Q3_K, False), (GGMLType.Q3_K, True), (GGMLType.IQ4_NL, False), (GGMLType.IQ4_NL, True),
         (GGMLType.IQ4_XS, False), (GGMLType.IQ4_XS, True)]  # fmt: skip
WHOLE = [c for c in CASES if native.whole(c[0].name, 256)]
DEMO = ["model.layers.0.mlp.down_proj.weight", "model.layers.9.self_attn.o_proj.weight"]
NATIVE = True  # the conftest's plain_quantizers leaves the native path on here


def case_id(c) -> str:
    return getattr(c, "name", str(c))


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch):
    """Per-process native and compiled-quantizer state, emptied for one test and restored after it."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(compiled_quantize, "_native_off", {})
    monkeypatch.setattr(compiled_quantize, "_native_checked", set())
    monkeypatch.setattr(compiled_quantize, "_off", {})
    monkeypatch.setattr(compiled_quantize, "_checked", set())
    monkeypatch.delenv(native.ENV, raising=False)
    return monkeypatch


@pytest.fixture(params=["best", "baseline"])
def built(request, fresh: pytest.MonkeyPatch):
    """The library at this CPU's level and at the compiler's default one; skips without a C compiler."""
    if request.param == "baseline":
        fresh.setenv(native.ISA_ENV, "baseline")
    try:
        native.library()
    except native.NativeError as e:
        if "no C compiler" in str(e):
            pytest.skip(str(e))
        raise
    assert request.param != "baseline" or native.built_isa == "baseline"
    return fresh


def strict_native(w: torch.Tensor, qtype: GGMLType, im: torch.Tensor | None) -> torch.Tensor:
    """quantize(compiled=True), failing where the native searches are not what ran."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiling.CompiledDequantWarning)
        got = quantize(w, qtype, im, compiled=True)
    assert (qtype, im is not None) in compiled_quantize._native_checked
    assert f"quantize {qtype.name} (native)" in compiling.compiled_types()
    assert not compiled_quantize._checked  # inductor never ran
    return got


def subnormal_rows(n: int) -> torch.Tensor:
    """Sub-blocks where the searches divide by (nearly) nothing: one subnormal weight among zeros,
    values a few ulp apart, all-negative and all-equal sub-blocks, a single huge outlier."""
    rows = torch.zeros(4, n)
    rows[0, ::32] = 1e-40
    rows[1] = 1.0 + torch.arange(n) % 3 * 1.2e-7
    rows[2] = -torch.rand(n, generator=torch.Generator().manual_seed(5)) * 0.01
    rows[2, 100 % n] = -0.5
    rows[3] = 0.02
    rows[3, 7] = 6.0e4
    return rows


@pytest.mark.subprocess  # builds the C library (a second; cached after)
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype,with_imatrix", CASES, ids=case_id)
def test_native_bytes_equal_libggml(built, qtype: GGMLType, with_imatrix: bool, one_thread) -> None:
    require_libggml()
    for seed, n in ((0, 1024), (1, 256)):
        w = torch.cat([random_rows(12, n, seed=seed), subnormal_rows(n)])  # outliers, zero/tiny/constant rows, ties
        w[3, 5::61] = 3.0
        im = imatrix(n, seed=seed + 7) if with_imatrix else None
        assert_same_blocks(strict_native(w, qtype, im), ggml_quantize(w, qtype, im), qtype)


@pytest.mark.subprocess
@pytest.mark.llamacpp
@pytest.mark.demo
@pytest.mark.parametrize("qtype,with_imatrix", WHOLE, ids=case_id)
def test_native_demo_tensors(demo_dir: Path, built, qtype: GGMLType, with_imatrix: bool, one_thread) -> None:
    require_libggml()
    for name in DEMO:
        w = demo_rows(demo_dir, name, 96)
        im = imatrix(w.shape[1], seed=3) if with_imatrix else None
        assert_same_blocks(strict_native(w, qtype, im), ggml_quantize(w, qtype, im), qtype)


@pytest.mark.subprocess
@pytest.mark.llamacpp
@pytest.mark.demo
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
def test_native_iq4_nl_on_rows_iq4_xs_cannot_take(demo_dir: Path, built, with_imatrix: bool, one_thread) -> None:
    """IQ4_NL where a scheme's IQ4_XS falls back to it: rows of 640 (not a multiple of 256)."""
    require_libggml()
    w = demo_rows(demo_dir, "model.layers.0.self_attn.q_proj.weight", 128).T.contiguous()
    assert w.shape[1] % 256 != 0
    im = imatrix(w.shape[1], seed=4) if with_imatrix else None
    assert_same_blocks(strict_native(w, GGMLType.IQ4_NL, im), ggml_quantize(w, GGMLType.IQ4_NL, im), GGMLType.IQ4_NL)


@pytest.mark.subprocess
def test_library_is_cached_and_shared(built, tmp_path: Path) -> None:
    """Built once into the cache directory, named by level; a second build finds it."""
    built.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = native._build()
    assert first.parent == tmp_path / "gemmaquant" / "native" and native.built_isa in first.name
    mtime = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left behind


def _plain_inductor(fresh: pytest.MonkeyPatch) -> None:
    """The fallback after native: the torch.compile table, here search.py's own functions (no compile)."""
    def plain(name):
        def run(*args):
            token = search.COMPILED.set(None)  # search.py's function itself, not this table again
            try:
                return getattr(search, name)(*args)
            finally:
                search.COMPILED.reset(token)
        return run

    fresh.setattr(compiled_quantize, "_searches", {name: plain(name) for name in compiled_quantize.SEARCHES})


@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q6_K], ids=case_id)
def test_no_compiler_warns_and_falls_back(fresh: pytest.MonkeyPatch, qtype: GGMLType) -> None:
    fresh.setenv("CC", "/nonexistent/cc")
    _plain_inductor(fresh)
    w = torch.randn(8, 512) * 0.02
    with pytest.warns(compiling.CompiledDequantWarning, match=r"native \(C\) quantizer searches turned off "
                      r"\(no C compiler: '/nonexistent/cc' not found.*using the torch.compile'd searches"):
        got = quantize(w, qtype, compiled=True)
    assert torch.equal(got, quantize(w, qtype, compiled=False))
    assert compiled_quantize.NATIVE_OFF in compiled_quantize._native_off
    assert (qtype, False) in compiled_quantize._checked  # the next path ran and passed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # off for the process: no second warning, no second try
        assert torch.equal(quantize(w, qtype, compiled=True), got)


def test_failed_build_warns_and_falls_back(fresh: pytest.MonkeyPatch) -> None:
    def no_build():
        raise native.NativeError("building search.c failed: search.c:1: error: something")

    fresh.setattr(native, "_build", no_build)
    _plain_inductor(fresh)
    w, im = torch.randn(8, 512) * 0.02, imatrix(512)
    with pytest.warns(compiling.CompiledDequantWarning, match=r"native \(C\).*building search.c failed"):
        got = quantize(w, GGMLType.Q4_K, im, compiled=True)
    assert torch.equal(got, quantize(w, GGMLType.Q4_K, im, compiled=False))
    assert (GGMLType.Q4_K, True) in compiled_quantize._checked


def test_unwritable_cache_warns_and_falls_back(fresh: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "gemmaquant").write_text("a file where the cache directory would go")
    fresh.setenv("XDG_CACHE_HOME", str(tmp_path))
    fresh.setattr(native, "compiler", lambda: ["cc"])
    fresh.setattr(native.subprocess, "run", lambda *a, **k: native.subprocess.CompletedProcess(a, 0, "cc 1.0", ""))
    _plain_inductor(fresh)
    w = torch.randn(4, 512) * 0.02
    with pytest.warns(compiling.CompiledDequantWarning, match=r"native \(C\).*native library: .*gemmaquant"):
        got = quantize(w, GGMLType.Q6_K, compiled=True)
    assert torch.equal(got, quantize(w, GGMLType.Q6_K, compiled=False))


@pytest.mark.parametrize("qtype", [GGMLType.Q6_K, GGMLType.Q4_0], ids=case_id)
def test_native_bytes_that_differ_fall_back(fresh: pytest.MonkeyPatch, qtype: GGMLType) -> None:
    """A whole native quantizer (Q6_K) or a native search (Q4_0's make_qx_quants) gone wrong."""
    def wrong_bytes(x, name, im):
        out = quantize(x, name, im, compiled=False)
        out[0, 0] ^= 1
        return out

    def wrong_scale(x, nmax, qw):
        token = search.COMPILED.set(None)
        try:
            scale, L = search.make_qx_quants(x, nmax, qw)
        finally:
            search.COMPILED.reset(token)
        return scale * 1.25, L

    fresh.setattr(native, "library", lambda: None)
    fresh.setattr(native, "quantize_rows", wrong_bytes)
    fresh.setattr(native, "table", lambda: {"make_qx_quants": wrong_scale})
    _plain_inductor(fresh)
    w, im = torch.randn(8, 512) * 0.02, imatrix(512)
    with pytest.warns(compiling.CompiledDequantWarning, match=f"native {qtype.name} quantizer turned off.*differs.*torch.compile"):
        got = quantize(w, qtype, im, compiled=True)
    assert torch.equal(got, quantize(w, qtype, im, compiled=False))
    assert qtype in compiled_quantize._native_off
    assert (qtype, True) in compiled_quantize._checked  # the next path ran and passed


@pytest.mark.subprocess
def test_half_conversion_is_torchs(built) -> None:
    """The C quantizers' float -> fp16 (round to nearest even, subnormals, overflow, signed zeros)."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[~x.isnan()]
    near = torch.arange(0x33000000 - 64, 0x47800000 + 64, 4099, dtype=torch.int32).view(torch.float32)  # every half exponent
    ties = (torch.arange(0, 2048, dtype=torch.float32) + 0.5) * 2.0**-24  # subnormal half ties
    x = torch.cat([x, near, -near, ties, torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, float("inf"), -1e9])])
    want = x.to(torch.float16).view(torch.int16)
    assert torch.equal(native.f32_to_f16_bits(x), want)


def test_native_off_by_environment(fresh: pytest.MonkeyPatch) -> None:
    fresh.setenv(native.ENV, "0")
    fresh.setattr(native, "library", lambda: pytest.fail("GEMMAQUANT_NATIVE=0 must not build"))
    _plain_inductor(fresh)
    w = torch.randn(4, 256) * 0.02
    assert torch.equal(quantize(w, GGMLType.Q6_K, compiled=True), quantize(w, GGMLType.Q6_K, compiled=False))
    assert not compiled_quantize._native_checked and (GGMLType.Q6_K, False) in compiled_quantize._checked


@pytest.mark.subprocess  # builds the C library (a second; cached after)
def test_native_is_the_default_without_torch_compile(built, one_thread) -> None:
    """quantize() with no `compiled` argument and --compile off: native, and never torch.compile."""
    built.setattr(compiled_quantize, "_table", lambda: pytest.fail("the default path must not torch.compile"))
    assert not compiling.enabled()
    w, im = torch.randn(8, 512) * 0.02, imatrix(512)
    for qtype, m in ((GGMLType.Q4_K, None), (GGMLType.Q4_0, im)):
        assert torch.equal(quantize(w, qtype, m), quantize(w, qtype, m, compiled=False))
        assert (qtype, m is not None) in compiled_quantize._native_checked
    # a type with no native code and no torch.compile: the plain quantizer, quietly
    assert torch.equal(quantize(w, GGMLType.Q8_0), quantize(w, GGMLType.Q8_0, compiled=False))


def test_default_without_a_compiler_is_quiet(fresh: pytest.MonkeyPatch) -> None:
    """No C compiler and no --compile: the plain quantizers, no warning (an optional speed-up, not a fault)."""
    fresh.setenv("CC", "/nonexistent/cc")
    fresh.setattr(compiled_quantize, "_table", lambda: pytest.fail("the default path must not torch.compile"))
    w = torch.randn(8, 512) * 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = quantize(w, GGMLType.Q6_K)
    assert torch.equal(got, quantize(w, GGMLType.Q6_K, compiled=False))
    assert compiled_quantize.NATIVE_OFF in compiled_quantize._native_off


def test_default_with_bytes_that_differ_warns_and_runs_plain(fresh: pytest.MonkeyPatch) -> None:
    """A native quantizer gone wrong on the default path: a warning, then the plain quantizer (not torch.compile)."""
    def wrong_bytes(x, name, im):
        out = quantize(x, name, im, compiled=False)
        out[0, 0] ^= 1
        return out

    fresh.setattr(native, "library", lambda: None)
    fresh.setattr(native, "table", lambda: {})
    fresh.setattr(native, "quantize_rows", wrong_bytes)
    fresh.setattr(compiled_quantize, "_table", lambda: pytest.fail("the default path must not torch.compile"))
    w = torch.randn(8, 512) * 0.02
    with pytest.warns(compiling.CompiledDequantWarning, match="native Q6_K quantizer turned off.*differs"):
        got = quantize(w, GGMLType.Q6_K)
    assert torch.equal(got, quantize(w, GGMLType.Q6_K, compiled=False))
    assert GGMLType.Q6_K in compiled_quantize._native_off


def test_bad_isa_name_is_one_line(fresh: pytest.MonkeyPatch) -> None:
    fresh.setenv(native.ISA_ENV, "avx9000")
    with pytest.raises(native.NativeError, match="GEMMAQUANT_NATIVE_ISA='avx9000': expected one of baseline, x86-64-v2"):
        native.isa()


def test_native_only_types_never_reach_torch_compile(fresh: pytest.MonkeyPatch) -> None:
    """Q2_K/Q3_K/IQ4_*: native or plain, never an (unchecked) torch.compile'd search."""
    fresh.setenv(native.ENV, "0")
    fresh.setattr(compiled_quantize, "_table", lambda: pytest.fail("Q2_K/Q3_K/IQ4 must not compile"))
    w = torch.randn(4, 512) * 0.02
    for qtype in (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS):
        for im in (None, imatrix(512)):
            assert torch.equal(quantize(w, qtype, im, compiled=True), quantize(w, qtype, im, compiled=False))


@pytest.mark.subprocess
def test_iq4_level_table_that_differs_falls_back(built) -> None:
    """The C keeps kvalues_iq4nl as a constant; a gguf whose table differed would turn it off, not
    write other levels' codes."""
    levels = iq4.kvalues().clone()
    levels[14] += 1.0
    built.setattr(iq4, "kvalues", lambda device="cpu": levels)
    w = torch.randn(4, 512) * 0.02
    with pytest.raises(native.NativeError, match="level table"):
        native.quantize_rows(w, "IQ4_XS", None)
    with pytest.warns(compiling.CompiledDequantWarning, match="native IQ4_XS quantizer turned off.*level table"):
        got = quantize(w, GGMLType.IQ4_XS, compiled=True)
    assert torch.equal(got, quantize(w, GGMLType.IQ4_XS, compiled=False))
    assert GGMLType.IQ4_XS in compiled_quantize._native_off


def test_compiler_choice(fresh: pytest.MonkeyPatch) -> None:
    """$CC wins (and must exist); without it, Python's build CC when it exists here, else cc/gcc/clang."""
    import shutil

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")
    fresh.delenv("CC", raising=False)
    fresh.setattr(native.sysconfig, "get_config_var", lambda name: "/opt/conda-build/bin/x86_64-conda-cc -pthread")
    assert Path(native.compiler()[0]).name in ("cc", "gcc", "clang")
    fresh.setenv("CC", "/nonexistent/cc -O1")
    with pytest.raises(native.NativeError, match="no C compiler: '/nonexistent/cc' not found"):
        native.compiler()


def test_sources_ship_as_package_data() -> None:
    """Every file the build compiles is listed in pyproject's package data (else a wheel cannot build it)."""
    import tomllib

    root = Path(native.__file__).parents[3]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    pkg = Path(native.__file__).parent
    shipped = {p for g in globs["gemmaquant.numerics.ggml"] for p in pkg.glob(g)}
    assert set(native.SOURCES + native.HEADERS) <= shipped
    assert set((pkg / "native").iterdir()) <= shipped
