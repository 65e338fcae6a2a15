"""The torch.compile dequantizers (the families' fused expressions via `numerics/ggml/compiled.py`) against the `gguf` package's
numpy ones: the same bit-equality as the plain kernels, with any fallback to the plain path made an
error (a silent fallback would pass these comparisons while the compiled kernel were wrong); and the
fallback itself, when compiling fails or a compiled kernel's bits differ."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from gemmaquant.numerics import compiling
from gemmaquant.numerics.ct import compiled as ct_compiled
from gemmaquant.numerics.ggml import compiled, registry
from gemmaquant.numerics.ggml.dequantize import dequantize
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.types import GGMLType, row_bytes
from tests.numerics.ggml.demo_gguf import quantized_tensor
from tests.numerics.ggml.libggml import ggml_quantize, require_libggml
from tests.numerics.ggml.family_checks import assert_bit_equal, gguf_dequantize
from tests.numerics.ggml.test_dequantize import DEMO_TENSORS
from tests.numerics.ggml.test_quantize import QUANT_TYPES, synthetic

TYPES = QUANT_TYPES + [GGMLType.F16, GGMLType.BF16]
FUSED = {t: k.fused for t, k in registry.TYPES.items() if k.fused is not None}


def strict_compiled(data: torch.Tensor, qtype: GGMLType, shape: tuple[int, ...], **kw) -> torch.Tensor:
    """dequantize(compiled=True), failing where the compiled kernel is not what ran."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiling.CompiledDequantWarning)
        got = dequantize(data, qtype, shape, compiled=True, **kw)
    assert compiled._kernels.get(qtype) is not None and qtype in compiled._checked
    return got


def test_every_type_has_a_fused_kernel() -> None:
    assert set(FUSED) == set(TYPES)


@pytest.mark.subprocess
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bytes_from_our_quantizer(qtype: GGMLType) -> None:
    w = synthetic(64, 512)
    data = quantize(w, qtype)
    assert_bit_equal(strict_compiled(data, qtype, tuple(w.shape)), gguf_dequantize(data.numpy(), qtype, tuple(w.shape)))


@pytest.mark.subprocess
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_random_bytes_any_block_count(qtype: GGMLType, rows: int) -> None:
    # Every bit pattern (subnormal/inf/NaN scales, 6-bit scale packings with all high bits set),
    # and block counts that change between calls: one graph with a dynamic count serves them all.
    shape = (rows, 768)
    data = torch.randint(0, 256, (rows * row_bytes(qtype, 768),), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(int(qtype) + rows))  # fmt: skip
    ref = gguf_dequantize(data.numpy().reshape(rows, -1), qtype, shape)
    assert_bit_equal(strict_compiled(data, qtype, shape), ref)


@pytest.mark.subprocess
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_bytes_from_libggml_into_reused_out(qtype: GGMLType) -> None:
    require_libggml()
    w = synthetic(32, 1024, seed=3)
    data = ggml_quantize(w, qtype, torch.rand(1024) + 0.1)
    out = torch.full(tuple(w.shape), float("nan"))
    assert strict_compiled(data, qtype, tuple(w.shape), out=out) is out
    assert_bit_equal(out, gguf_dequantize(data.numpy(), qtype, tuple(w.shape)))


@pytest.mark.subprocess
@pytest.mark.demo
def test_real_demo_tensors(request: pytest.FixtureRequest) -> None:
    for name in DEMO_TENSORS:
        qtype, data, shape = quantized_tensor(request.config, name, max_rows=1024)
        assert_bit_equal(strict_compiled(torch.from_numpy(data), qtype, shape), gguf_dequantize(data, qtype, shape))


def test_f32_takes_the_plain_path() -> None:
    # F32 has no fused kernel (a copy needs none): plain path, no warning, same bits.
    w = synthetic(4, 256)
    data = quantize(w, GGMLType.F32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = dequantize(data, GGMLType.F32, tuple(w.shape), compiled=True)
    assert torch.equal(got, w)


@pytest.fixture
def fresh_state():
    """Run with empty compiled-kernel caches; put the real ones back after."""
    tables = (compiled._kernels, compiled._checked, ct_compiled._kernels, ct_compiled._checked)
    saved = [t.copy() for t in tables]
    for t in tables:
        t.clear()
    yield
    for t, old in zip(tables, saved):
        t.clear()
        t.update(old)


def test_compile_failure_falls_back_with_a_warning(fresh_state) -> None:
    def broken(b, f, out):
        raise RuntimeError("no C++ compiler found\nmore detail")

    compiled._kernels[GGMLType.Q6_K] = broken
    w = synthetic(8, 512)
    data = quantize(w, GGMLType.Q6_K)
    with pytest.warns(compiling.CompiledDequantWarning, match=r"Q6_K dequantizer turned off \(RuntimeError: no C\+\+"):
        got = dequantize(data, GGMLType.Q6_K, tuple(w.shape), compiled=True)
    assert_bit_equal(got, gguf_dequantize(data.numpy(), GGMLType.Q6_K, tuple(w.shape)))
    assert compiled._kernels[GGMLType.Q6_K] is None  # not tried again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dequantize(data, GGMLType.Q6_K, tuple(w.shape), compiled=True)


def test_wrong_bits_are_caught_by_the_first_call_check(fresh_state) -> None:
    def off_by_one_ulp(b, f, out):  # what an FMA-contracting compiler would do to a few values
        FUSED[GGMLType.Q4_K](b, f, out)
        out.view(torch.int32)[0, 0] += 1

    compiled._kernels[GGMLType.Q4_K] = off_by_one_ulp
    w = synthetic(8, 512)
    data = quantize(w, GGMLType.Q4_K)
    with pytest.warns(compiling.CompiledDequantWarning, match="differs from the plain kernel's bits"):
        got = dequantize(data, GGMLType.Q4_K, tuple(w.shape), compiled=True)
    assert_bit_equal(got, gguf_dequantize(data.numpy(), GGMLType.Q4_K, tuple(w.shape)))


@pytest.mark.parametrize("why", ["compile fails", "wrong bits"])
def test_compressed_tensors_fallback(fresh_state, why) -> None:
    from gemmaquant.numerics.ct import dequantize as ct_dequantize
    from gemmaquant.numerics.ct import quantize_fp8

    def broken(q, scale):
        if why == "compile fails":
            raise RuntimeError("no C++ compiler found")
        return (q.float() * scale.float()).to(scale.dtype) * 2  # wrong values

    ct_compiled._kernels["ct_scaled"] = broken
    p = quantize_fp8((synthetic(16, 256) * 1.0).to(torch.bfloat16), "channel")
    was = compiling.enabled()
    try:
        compiling.set_enabled(False)
        want = ct_dequantize(p)
        compiling.set_enabled(True)
        with pytest.warns(compiling.CompiledDequantWarning, match="ct_scaled dequantizer turned off"):
            got = ct_dequantize(p)
    finally:
        compiling.set_enabled(was)
    assert torch.equal(got, want)
    assert ct_compiled._kernels["ct_scaled"] is None


@pytest.mark.subprocess
@pytest.mark.parametrize("value, on", [("1", True), ("on", True), ("0", False), ("", False)])
def test_environment_switch(value: str, on: bool) -> None:
    code = "from gemmaquant.numerics import compiling; print(compiling.enabled())"
    env = {**os.environ, compiling.ENV: value}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == str(on)
