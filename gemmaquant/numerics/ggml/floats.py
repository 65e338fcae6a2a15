"""F32, F16 and BF16: conversions, not blocks (a block is one value). Quantizing converts the whole
source tensor (any float dtype) as llama-quantize does and ignores an importance matrix;
dequantizing is a widening copy to float32.
"""

from __future__ import annotations

import torch

from gemmaquant.numerics.ggml.family import GGMLKernels
from gemmaquant.numerics.ggml.fused import store
from gemmaquant.numerics.ggml.types import GGMLType


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[rows, n] values -> their bytes, [rows, n * element size] uint8."""
    return t.contiguous().view(torch.uint8).view(t.shape[0], t.shape[1] * t.element_size())


def quantize_f32(w: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    return _as_rows(w.to(torch.float32))


def quantize_f16(w: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    # Through float32 first: a bf16 source then rounds once, from its exact float32 value.
    return _as_rows(w.to(torch.float32).to(torch.float16))


def quantize_bf16(w: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """GGML_FP32_TO_BF16: round to nearest even on the bits; NaN forced quiet. A bf16 value is copied
    (its NaN payloads included)."""
    if w.dtype == torch.bfloat16:
        return _as_rows(w)
    u = w.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = torch.where(nan, (u >> 16) | 64, rounded).to(torch.int32).to(torch.int16)
    return _as_rows(bits)


def dequantize_f32(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.contiguous().view(torch.float32))


def dequantize_f16(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.contiguous().view(torch.float16))


def dequantize_bf16(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.contiguous().view(torch.bfloat16))


def fused_f16(b, f, out):
    store(out, f.float())


def fused_bf16(b, f, out):
    store(out, f.view(torch.bfloat16).float())


TYPES = {
    # F32 has no fused kernel: its plain copy is already one pass.
    GGMLType.F32: GGMLKernels(quantize_f32, dequantize_f32, None, is_float=True),
    GGMLType.F16: GGMLKernels(quantize_f16, dequantize_f16, fused_f16, is_float=True),
    GGMLType.BF16: GGMLKernels(quantize_bf16, dequantize_bf16, fused_bf16, is_float=True),
}
