"""Integer weight grids in the compressed-tensors convention (docs/vllm-formats.md §0, §4).

Signed codes q ∈ [qmin, qmax] = [−2^(b−1), 2^(b−1) − 1]; w ≈ (q − zp)·scale, zp = 0 when symmetric.
  symmetric:  scale = absmax / ((qmax − qmin)/2)     (/7.5 for INT4, /127.5 for INT8)
  asymmetric: scale = (max − min)/(qmax − qmin), with min ≤ 0 ≤ max (zero is always representable),
              zp = clamp(round(qmin − min/scale), qmin, qmax)  — a *signed* zero point
Scales are rounded to bf16 (what the checkpoint stores) BEFORE codes and zero points are derived,
so dequantizing the stored tensors reproduces exactly what was optimised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def minmax_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [rows, k] → (scale [rows] float32 holding bf16 values, zp [rows] float32 or None)."""
    qmin, qmax = qrange(bits)
    w = w.float()
    if symmetric:
        scale = w.abs().amax(1) / ((qmax - qmin) / 2)
        zp = None
    else:
        lo = w.amin(1).clamp(max=0)
        hi = w.amax(1).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
    # an all-zero row: any scale gives codes 0 (and zp 0 below); 1.0 avoids 0/0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.bfloat16).float()
    if not symmetric:
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zp


def quantize(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes (float32 holding integers) for w [rows, k] with per-row (broadcast) scale/zp [rows, 1]."""
    qmin, qmax = qrange(bits)
    q = torch.round(w / scale)
    if zp is not None:
        q = q + zp
    return q.clamp_(qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    return (q - zp) * scale if zp is not None else q * scale


@dataclass(frozen=True)
class WeightQuant:
    """One quantized Linear: codes [out, in] int8, scale [out, groups] bf16, zero_point [out, groups] int8.

    groups = in / group_size (1 for per-channel). These are exactly the values the compressed-tensors
    writer packs (`weight_packed`/`weight` + `weight_scale` + `weight_zero_point`).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int | None  # None: per output channel

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]."""
        k = self.codes.shape[1] if self.group_size is None else self.group_size
        scale = self.scale.float().repeat_interleave(k, dim=1)
        zp = None if self.zero_point is None else self.zero_point.float().repeat_interleave(k, dim=1)
        return dequantize(self.codes.float(), scale, zp)


def rtn(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> WeightQuant:
    """Round-to-nearest with min-max group parameters (the baseline GPTQ/AWQ must beat)."""
    rows, cols = w.shape
    k = cols if group_size is None else group_size
    if cols % k:
        raise ValueError(f"in_features {cols} is not a multiple of the group size {k}")
    g = w.float().reshape(rows * (cols // k), k)
    scale, zp = minmax_qparams(g, bits, symmetric)
    q = quantize(g, scale[:, None], None if zp is None else zp[:, None], bits)
    return WeightQuant(q.reshape(rows, cols).to(torch.int8), scale.reshape(rows, -1).to(torch.bfloat16),
                       None if zp is None else zp.reshape(rows, -1).to(torch.int8), bits, group_size)


def split_rows(q: WeightQuant, sizes: list[int]) -> list[WeightQuant]:
    """Split a result for row-concatenated Linears (q/k/v, gate/up share one GPTQ run) back apart."""
    zps = [None] * len(sizes) if q.zero_point is None else q.zero_point.split(sizes)
    return [WeightQuant(c, s, z, q.bits, q.group_size)
            for c, s, z in zip(q.codes.split(sizes), q.scale.split(sizes), zps)]
