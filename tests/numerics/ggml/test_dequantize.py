"""Our torch dequantizers against the `gguf` package's numpy ones: bit-equal float32 output on
bytes from our quantizer, from llama.cpp's, on random bytes, and on the demo GGUF's real tensors."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.numerics.ggml.dequantize import dequantize
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.types import GGMLType, row_bytes
from tests.numerics.ggml.demo_gguf import quantized_tensor
from tests.numerics.ggml.family_checks import assert_bit_equal, gguf_dequantize
from tests.numerics.ggml.libggml import ggml_quantize, require_libggml
from tests.numerics.ggml.test_quantize import FLOAT_TYPES, QUANT_TYPES, synthetic

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_bytes_from_our_quantizer(qtype: GGMLType) -> None:
    w = synthetic(64, 512)
    data = quantize(w, qtype)
    assert_bit_equal(dequantize(data, qtype, w.shape), gguf_dequantize(data.numpy(), qtype, tuple(w.shape)))


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_bytes_from_libggml_with_imatrix(qtype: GGMLType) -> None:
    require_libggml()
    w = synthetic(32, 1024, seed=3)
    data = ggml_quantize(w, qtype, torch.rand(1024) + 0.1)
    assert_bit_equal(dequantize(data, qtype, w.shape), gguf_dequantize(data.numpy(), qtype, tuple(w.shape)))


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_random_bytes_and_flat_input(qtype: GGMLType) -> None:
    # Every bit pattern: subnormal/inf/NaN scales, 6-bit scale packings with all high bits set.
    shape = (8, 512)
    data = torch.randint(0, 256, (shape[0] * row_bytes(qtype, shape[1]),), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(int(qtype)))  # fmt: skip
    assert_bit_equal(dequantize(data, qtype, shape), gguf_dequantize(data.numpy().reshape(shape[0], -1), qtype, shape))


DEMO_TENSORS = ["blk.0.attn_output.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight",
                "blk.0.attn_v.weight", "token_embd.weight"]  # fmt: skip


@pytest.mark.demo
def test_real_demo_tensors(request: pytest.FixtureRequest) -> None:
    # The Q4_K_M demo file holds Q4_K, Q5_0, Q6_K and Q8_0 tensors among these.
    seen = set()
    for name in DEMO_TENSORS:
        qtype, data, shape = quantized_tensor(request.config, name, max_rows=1024)
        ours = dequantize(torch.from_numpy(data), qtype, shape)
        assert_bit_equal(ours, gguf_dequantize(data, qtype, shape))
        seen.add(qtype)
    assert seen >= {GGMLType.Q4_K, GGMLType.Q5_0, GGMLType.Q6_K, GGMLType.Q8_0}, seen


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F16], ids=lambda t: t.name)
def test_into_reused_out_buffer(qtype: GGMLType) -> None:
    w = synthetic(16, 1024, seed=5)
    data = quantize(w, qtype)  # llama.cpp's bytes (test_quantize.py); no libggml needed here
    out = torch.full(tuple(w.shape), float("nan"))
    got = dequantize(data, qtype, w.shape, out=out)
    assert got is out
    assert_bit_equal(out, gguf_dequantize(data.numpy(), qtype, tuple(w.shape)))
    with pytest.raises(GemmaQuantError, match="out= must be a contiguous float32"):
        dequantize(data, qtype, w.shape, out=torch.empty(4, 4))


def test_size_mismatch_is_a_user_error() -> None:
    with pytest.raises(GemmaQuantError, match="Q6_K data of 100 bytes does not match shape"):
        dequantize(torch.zeros(100, dtype=torch.uint8), GGMLType.Q6_K, (1, 256))


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q4_K], ids=lambda t: t.name)
def test_large_fresh_output_on_huge_pages(qtype: GGMLType) -> None:
    # 8 MiB of float32 output: allocated 2 MiB-aligned and advised for huge pages (empty_f32)
    w = synthetic(64, 512, seed=7)
    data = quantize(w, qtype).repeat(64, 1)
    got = dequantize(data, qtype, (4096, 512))
    assert got.is_contiguous() and got.data_ptr() % (1 << 21) == 0
    assert_bit_equal(got, gguf_dequantize(data.numpy(), qtype, (4096, 512)))


@pytest.mark.parametrize("offset", [1, 2, 6])
def test_bytes_at_any_offset(offset: int) -> None:
    # The kernels view whole blocks as int16/int64: bytes starting mid-word (a slice of a larger
    # buffer, as a file mapping can give) are copied to an aligned buffer first, not misread.
    w = synthetic(8, 512, seed=11)
    data = quantize(w, GGMLType.Q6_K).reshape(-1)
    buf = torch.zeros(data.numel() + offset, dtype=torch.uint8)
    buf[offset:] = data
    got = dequantize(buf[offset:], GGMLType.Q6_K, tuple(w.shape))
    assert_bit_equal(got, gguf_dequantize(data.numpy().reshape(8, -1), GGMLType.Q6_K, tuple(w.shape)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("qtype", list(GGMLType), ids=lambda t: t.name)
def test_cuda_matches_cpu(qtype: GGMLType) -> None:
    # The plain kernels on CUDA: one launch set per tensor, the same bits as on the CPU (random bytes
    # included, so NaN/inf/subnormal scales take the GPU's paths too).
    shape = (40, 768)
    data = torch.randint(0, 256, (shape[0] * row_bytes(qtype, shape[1]),), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(int(qtype)))  # fmt: skip
    cpu = dequantize(data, qtype, shape)
    gpu = dequantize(data.cuda(), qtype, shape, compiled=True)  # compiled=True must fall back on CUDA
    assert gpu.is_cuda
    assert_bit_equal(gpu, cpu.numpy())
