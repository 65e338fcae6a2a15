"""Integer weight grids in the compressed-tensors convention (docs/vllm-formats.md §0, §4).

Signed codes q ∈ [qmin, qmax] = [−2^(b−1), 2^(b−1) − 1]; w ≈ (q − zp)·scale, zp = 0 when symmetric.
  symmetric:  scale = absmax / ((qmax − qmin)/2)     (/7.5 for INT4, /127.5 for INT8)
  asymmetric: scale = (max − min)/(qmax − qmin), with min ≤ 0 ≤ max (zero is always representable),
              zp = clamp(round(qmin − min/scale), qmin, qmax)  — a *signed* zero point
Scales are rounded to bf16 (what the checkpoint stores) BEFORE codes and zero points are derived,
so dequantizing the stored tensors reproduces exactly what was optimised. The parameters are
quantize.int_qparams', the writers' own (one grid, one rule for an all-zero group: scale eps, codes 0);
this module adds what calibration needs on top: per-row groups, the clipping search, codes as floats.

Min-max parameters waste resolution on a group's single largest weight. `search_qparams` shrinks the
range by p ∈ {1, 1 − 1/n, …, 1 − max_shrink} and keeps, per group, the p with the smallest (optionally
importance-weighted) squared rounding error — llm-compressor's "mse" observer (there: |Δ|^2.4, p down to
0.8) and AWQ's clip search (there: output error, p down to 0.5). p = 1 is always a candidate, so the
result is never worse than min-max on the measured error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantize import int_qparams, int_range


def minmax_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [rows, k] → (scale [rows] float32 holding bf16 values, zp [rows] float32 or None): the
    writers' min-max parameters (int_qparams) computed in float32, one group per row."""
    w = w.float()
    scale, zp = int_qparams(w.amin(1), w.amax(1), bits, symmetric, scale_dtype=torch.bfloat16)
    return scale.float(), None if zp is None else zp.float()


def search_qparams(w: torch.Tensor, bits: int, symmetric: bool, *, importance: torch.Tensor | None = None,
                   max_shrink: float = 0.2, n_grid: int = 20) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like `minmax_qparams`, with the range shrunk per row to minimise Σ_j importance_j·(w_j − ŵ_j)².

    w [rows, k]; importance [k] or [rows, k] (e.g. diag of the Hessian), None = plain MSE.
    """
    w = w.float()
    imp = torch.ones_like(w) if importance is None else importance.float().expand_as(w)
    best_s, best_z = minmax_qparams(w, bits, symmetric)
    best_err = _weighted_err(w, best_s, best_z, bits, imp)
    for i in range(1, int(round(max_shrink * n_grid)) + 1):
        p = 1 - i / n_grid
        # shrinking w shrinks its min-max range (abs-max, or min and max about zero) by exactly p
        s, z = minmax_qparams(w * p, bits, symmetric)
        err = _weighted_err(w, s, z, bits, imp)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _weighted_err(w, s, z, bits, imp) -> torch.Tensor:
    zc = None if z is None else z[:, None]
    d = w - dequantize(quantize(w, s[:, None], zc, bits), s[:, None], zc)
    return (imp * d * d).sum(1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes (float32 holding integers) for w [rows, k] with per-row (broadcast) scale/zp [rows, 1]."""
    qmin, qmax = int_range(bits)
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


def rtn(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, *, mse: bool = False,
        importance: torch.Tensor | None = None) -> WeightQuant:
    """Round-to-nearest with min-max group parameters (the baseline GPTQ/AWQ must beat).

    mse: search the clipping range per group (`search_qparams`), weighting the error by
    `importance` [in] when given.
    """
    rows, cols = w.shape
    k = cols if group_size is None else group_size
    if cols % k:
        raise ValueError(f"in_features {cols} is not a multiple of the group size {k}")
    g = w.float().reshape(rows * (cols // k), k)
    if mse:
        imp = None if importance is None else importance.float().reshape(1, cols // k, k).expand(
            rows, -1, -1).reshape(rows * (cols // k), k)
        scale, zp = search_qparams(g, bits, symmetric, importance=imp)
    else:
        scale, zp = minmax_qparams(g, bits, symmetric)
    q = quantize(g, scale[:, None], None if zp is None else zp[:, None], bits)
    return WeightQuant(q.reshape(rows, cols).to(torch.int8), scale.reshape(rows, -1).to(torch.bfloat16),
                       None if zp is None else zp.reshape(rows, -1).to(torch.int8), bits, group_size)


def split_rows(q: WeightQuant, sizes: list[int]) -> list[WeightQuant]:
    """Split a result for row-concatenated Linears (q/k/v, gate/up share one GPTQ run) back apart."""
    zps = [None] * len(sizes) if q.zero_point is None else q.zero_point.split(sizes)
    return [WeightQuant(c, s, z, q.bits, q.group_size)
            for c, s, z in zip(q.codes.split(sizes), q.scale.split(sizes), zps)]
