"""Plain-torch dequantization of compressed-tensors weights (CPU or CUDA, no Triton).

    w = (q - zp) * scale        zp = 0 when symmetric
computed like compressed-tensors' `_dequantize`: codes and zero points are cast to the scale's dtype,
subtracted, and multiplied by the scale in that dtype, so a bf16 scale gives a bf16 weight rounded
exactly as ct's decompressor (and transformers' load of the checkpoint) rounds it. Codes are small
integers and q - zp is at most 255 in magnitude, so both casts and the subtraction are exact in bf16.
"""

from __future__ import annotations

import torch

from .. import compiling
from .compiled import ct_run
from .pack import unpack_from_int32
from .quantize import FloatQuantized, IntQuantized, Packed, PackQuantized

Tensor = torch.Tensor


def _grouped(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """(q - zp) * scale with scale/zp of shape [1], [N, 1] or [N, G] over q [N, K]; with the compiled
    dequantizers on (`numerics.compiling`), one fused loop of the same bits (`compiled.py`)."""
    if compiling.enabled():
        got = ct_run(q, scale, zero_point, _grouped_plain)
        if got is not None:
            return got
    return _grouped_plain(q, scale, zero_point)


def _grouped_plain(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    n, k = q.shape
    x = q.to(scale.dtype)
    if scale.ndim == 2 and scale.shape[1] > 1:
        g = scale.shape[1]
        if k % g:
            raise ValueError(f"width {k} is not divisible into {g} scale groups")
        x = x.view(n, g, k // g)
        scale = scale.unsqueeze(-1)
        zero_point = None if zero_point is None else zero_point.unsqueeze(-1)
    if zero_point is not None:
        x = x - zero_point.to(scale.dtype)
    return (x * scale).reshape(n, k)


def dequantize_fp8(weight: Tensor, weight_scale: Tensor) -> Tensor:
    """float8_e4m3fn [N, K] with scale [N, 1] (channel) or [1] / [] (tensor) -> scale dtype."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"FP8 weight must be float8_e4m3fn, got {weight.dtype}")
    return _grouped(weight, weight_scale.reshape(1) if weight_scale.ndim == 0 else weight_scale, None)


def dequantize_int8(weight: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None = None) -> Tensor:
    """int8 [N, K] (int-quantized) with scale [N, 1] (or [1]) and optional int8 zero point."""
    if weight.dtype != torch.int8:
        raise ValueError(f"INT8 weight must be int8, got {weight.dtype}")
    return _grouped(weight, weight_scale, weight_zero_point)


def dequantize_packed(weight_packed: Tensor, weight_scale: Tensor, weight_shape, num_bits: int,
                      weight_zero_point: Tensor | None = None) -> Tensor:
    """pack-quantized int32 words -> [N, K] in the scale's dtype. Groups are inferred from the
    scale: [N, K / group_size], or [N, 1] for per-channel. The zero point, if any, is packed along
    dim 0: int32 [ceil(N * bits / 32), G]."""
    n, k = (int(v) for v in torch.as_tensor(weight_shape).tolist())
    q = unpack_from_int32(weight_packed, num_bits, (n, k))
    zp = None
    if weight_zero_point is not None:
        zp = unpack_from_int32(weight_zero_point, num_bits, (n, weight_scale.shape[-1]), packed_dim=0)
    return _grouped(q, weight_scale, zp)


def dequantize(p: Packed, num_bits: int | None = None) -> Tensor:
    """Dequantize one Linear's tensors; `num_bits` is needed for pack-quantized (4 or 8)."""
    if isinstance(p, FloatQuantized):
        return dequantize_fp8(p.weight, p.weight_scale)
    if isinstance(p, IntQuantized):
        return dequantize_int8(p.weight, p.weight_scale)
    if isinstance(p, PackQuantized):
        if num_bits is None:
            raise ValueError("dequantize(PackQuantized) needs num_bits")
        return dequantize_packed(p.weight_packed, p.weight_scale, p.weight_shape, num_bits,
                                 p.weight_zero_point)
    raise TypeError(f"not a quantized weight: {type(p).__name__}")
