"""Our dequantization equals compressed-tensors' decompressors bit for bit: the plain torch kernels and
the compiled ones."""

from __future__ import annotations

import warnings

import pytest
import torch

from gemmaquant.numerics.ct import (dequantize, dequantize_fp8, dequantize_packed, dequantize_tensors, pack_to_int32,
                           quantize_fp8, quantize_int8, quantize_pack)
from gemmaquant.numerics import compiling
from gemmaquant.numerics.ct import compiled

ct_q = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.compressors.naive_quantized.base import (  # noqa: E402
    FloatQuantizationCompressor, IntQuantizationCompressor)
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402

QArgs, QScheme = ct_q.QuantizationArgs, ct_q.QuantizationScheme


@pytest.fixture(autouse=True, params=["plain", pytest.param("compiled", marks=pytest.mark.subprocess)])  # inductor runs a C++ compiler
def path(request):
    """Every test twice: the plain kernels, and the torch.compile ones (`ct.compiled`, CPU) with any
    fallback to the plain path made an error, and at least one compiled kernel required to have run."""
    was = compiling.enabled()
    compiling.set_enabled(request.param == "compiled")
    compiled._checked.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", compiling.CompiledDequantWarning)
            yield request.param
        if request.param == "compiled" and request.node.name.split("[")[0] != "test_cuda_matches_cpu":
            assert compiled._checked, "no compiled kernel ran"
    finally:
        compiling.set_enabled(was)


def weight(n=40, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.03
    w[1, 5] = 0.7
    return w.to(torch.bfloat16)


def _scheme(**kw):
    return QScheme(targets=["Linear"], weights=QArgs(**kw))


@pytest.mark.parametrize("bits,sym,gs", [(4, True, 128), (4, False, 128), (4, False, 32), (4, True, None),
                                         (8, True, None), (8, False, None), (8, True, 64)])
def test_packed_dequant_matches_ct_decompress(bits, sym, gs):
    w = weight(seed=bits + gs if gs else bits)
    p = quantize_pack(w, bits, group_size=gs, symmetric=sym)
    ours = dequantize(p, bits)
    theirs = PackedQuantizationCompressor.decompress(
        p.tensors(), _scheme(num_bits=bits, type="int", symmetric=sym, strategy="group" if gs else "channel",
                             group_size=gs))["weight"]
    assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.shape == w.shape
    assert torch.equal(ours, theirs)
    assert torch.equal(dequantize_tensors(p.tensors(), "pack-quantized", bits), ours)


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_dequant_matches_ct_decompress(strategy):
    f = quantize_fp8(weight(seed=3), strategy)
    theirs = FloatQuantizationCompressor.decompress(
        f.tensors(), _scheme(num_bits=8, type="float", symmetric=True, strategy=strategy))["weight"]
    assert torch.equal(dequantize(f), theirs)
    # AutoFP8-style 0-d per-tensor scale (vLLM accepts it): same values
    if strategy == "tensor":
        assert torch.equal(dequantize_fp8(f.weight, f.weight_scale.reshape(())), theirs)


def test_int8_dequant_matches_ct_decompress():
    q = quantize_int8(weight(seed=4))
    theirs = IntQuantizationCompressor.decompress(
        q.tensors(), _scheme(num_bits=8, type="int", symmetric=True, strategy="channel"))["weight"]
    assert torch.equal(dequantize(q), theirs)


def test_hand_made_block():
    # one row, 2 groups of 8: codes 0..7 and -8..-1, zp (+1, -2), scales (0.5, 0.25)
    codes = torch.tensor([list(range(8)) + list(range(-8, 0))], dtype=torch.int8)
    zp = torch.tensor([[1, -2]], dtype=torch.int8)
    scale = torch.tensor([[0.5, 0.25]], dtype=torch.bfloat16)
    w = dequantize_packed(pack_to_int32(codes, 4), scale, [1, 16], 4, pack_to_int32(zp, 4, packed_dim=0))
    expect = [(c - 1) * 0.5 for c in range(8)] + [(c + 2) * 0.25 for c in range(-8, 0)]
    assert w.dtype == torch.bfloat16 and w.float().tolist() == [expect]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    p = quantize_pack(weight(seed=5), 4, group_size=128, symmetric=False)
    cpu = dequantize(p, 4)
    gpu = dequantize_packed(p.weight_packed.cuda(), p.weight_scale.cuda(), p.weight_shape, 4,
                            p.weight_zero_point.cuda())
    assert torch.equal(gpu.cpu(), cpu)
    f = quantize_fp8(weight(seed=6))
    assert torch.equal(dequantize_fp8(f.weight.cuda(), f.weight_scale.cuda()).cpu(), dequantize(f))
