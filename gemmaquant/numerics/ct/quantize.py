"""Round-to-nearest quantizers for compressed-tensors checkpoints: FP8 E4M3, INT8, packed INT4/INT8.

Each returns a frozen dataclass whose fields are the tensors written for one Linear `P`, named by
their suffix (`P.weight`, `P.weight_scale`, ...). The arithmetic mirrors compressed-tensors 0.20
(`quantization/utils/helpers.py calculate_qparams`, `lifecycle/forward_helpers.py _quantize`)
operation by operation, *in the dtype of the inputs*, so for the same inputs our codes are
bit-identical to ct's (tests/numerics/ct/test_quantize.py). The dtype matters: for a bf16 weight and a bf16
scale, ct (and llm-compressor, which feeds it bf16) rounds `w / s` to bf16 before rounding it to an
integer, and bf16 holds only multiples of 0.5 above 64, so INT8 codes >= 64 can land 0.75 of a step
from the true value. `formats.quantize_for` (the writers' entry point) therefore computes in float32: exact
round-to-nearest of the bf16 weight by the stored scale (INT8 weight error 0.79% instead of 0.84%,
FP8 2.64% instead of 2.66% on Gaussian weights). Pass bf16 tensors to reproduce llm-compressor.

Min-max conventions (ct's observer, see docs/vllm-formats.md §0):
    range first widened to include 0:  mn = min(min(w), 0),  mx = max(max(w), 0)
    symmetric   scale = max(|mn|, |mx|) / ((qmax - qmin) / 2)    FP8: /448, INT8: /127.5, INT4: /7.5
    asymmetric  scale = (mx - mn) / (qmax - qmin)                 INT4: /15
                zp    = round(clamp(qmin - mn / scale, qmin, qmax))   signed, e.g. -8..7
    codes       q = round(clamp(w / scale + zp, qmin, qmax))     (FP8: cast after clamping to ±448)
With /127.5 and /7.5 the largest |w| lands half a step past qmax and is clamped back to qmax.
A scale of 0 (an all-zero row/group) becomes the computing dtype's epsilon, as in ct.

The scale is rounded to its stored dtype (bf16 by default) *before* the weight is divided by it,
so the stored (scale, codes) pair is what we quantized with. Scales, zero points and integer codes
chosen elsewhere (GPTQ, AWQ, calibrated input scales) go through the same functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .pack import pack_to_int32

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3FN value; E4M3FN has no inf, an unsaturated overflow casts to NaN
SCALE_DTYPE = torch.bfloat16  # llm-compressor stores scales in the model dtype (bf16 for Gemma)
Tensor = torch.Tensor


class _Tensors:
    def tensors(self) -> dict[str, Tensor]:
        """{suffix: tensor} of the tensors to write, e.g. {"weight_packed": ..., "weight_scale": ...}."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class FloatQuantized(_Tensors):
    """`float-quantized` FP8 W8A8."""

    weight: Tensor  # float8_e4m3fn [N, K]
    weight_scale: Tensor  # [N, 1] (channel) or [1] (tensor)
    input_scale: Tensor | None = None  # [1], static activations only (fp8-static)


@dataclass(frozen=True)
class IntQuantized(_Tensors):
    """`int-quantized` INT8 W8A8: symmetric per-channel, no zero point."""

    weight: Tensor  # int8 [N, K]
    weight_scale: Tensor  # [N, 1]


@dataclass(frozen=True)
class PackQuantized(_Tensors):
    """`pack-quantized` weight-only INT4/INT8 (W4A16, W8A16)."""

    weight_packed: Tensor  # int32 [N, ceil(K * bits / 32)]
    weight_scale: Tensor  # [N, K / group_size], or [N, 1] for channel
    weight_shape: Tensor  # int64 [2] = [N, K]
    weight_zero_point: Tensor | None = None  # int32 [ceil(N * bits / 32), G], asymmetric only


Packed = FloatQuantized | IntQuantized | PackQuantized


# -- ranges and parameters ---------------------------------------------------------------------
def int_range(num_bits: int) -> tuple[int, int]:
    """Signed code range, e.g. (-8, 7) for 4 bits."""
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _check_weight(w: Tensor) -> None:
    if w.ndim != 2 or not w.dtype.is_floating_point:
        raise ValueError(f"expected a 2-D float weight, got {w.dtype} {list(w.shape)}")
    lo, hi = torch.aminmax(w)  # NaN/Inf propagate; one pass, far cheaper than isfinite(w).all()
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise ValueError("weight contains NaN or Inf")


def minmax(w: Tensor, strategy: str, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Observed (min, max) of a weight [N, K] in its own dtype: [1] (tensor), [N, 1] (channel),
    or [N, K / group_size] (group)."""
    n, k = w.shape
    if strategy == "tensor":
        mn, mx = torch.aminmax(w)
        return mn.reshape(1), mx.reshape(1)
    if strategy == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if strategy == "group":
        if not group_size or k % group_size:
            raise ValueError(f"width {k} is not divisible by group size {group_size}")
        g = w.view(n, k // group_size, group_size)
        return g.amin(dim=-1), g.amax(dim=-1)
    raise ValueError(f"strategy {strategy!r} (allowed: tensor, channel, group)")


def int_qparams(wmin: Tensor, wmax: Tensor, num_bits: int, symmetric: bool, *,
                scale_dtype: torch.dtype = SCALE_DTYPE) -> tuple[Tensor, Tensor | None]:
    """ct's min-max (scale, zero point) for INT: scale in `scale_dtype`, zp int8 (None if symmetric).

    Computed in the dtype of wmin/wmax like ct, then the scale is rounded to `scale_dtype`; the
    zero point is derived from the rounded scale (identical to ct when the inputs are bf16)."""
    qmin, qmax = int_range(num_bits)
    zero = torch.zeros_like(wmin)
    mn, mx = torch.minimum(wmin, zero), torch.maximum(wmax, zero)
    if symmetric:
        scale = torch.maximum(mn.abs(), mx.abs()) / (float(qmax - qmin) / 2)
    else:
        scale = (mx - mn) / float(qmax - qmin)
    scale = torch.where(scale == 0, torch.tensor(_eps(scale.dtype), dtype=scale.dtype, device=scale.device), scale)
    scale = scale.to(scale_dtype)
    if symmetric:
        return scale, None
    zp = torch.clamp(qmin - mn / scale, qmin, qmax)
    return scale, torch.round(zp).to(torch.int8)


def fp8_scale(w: Tensor, strategy: str = "channel", *, scale_dtype: torch.dtype = SCALE_DTYPE) -> Tensor:
    """absmax / 448 per output channel [N, 1] or per tensor [1], rounded to `scale_dtype`."""
    mn, mx = minmax(w, strategy)
    zero = torch.zeros_like(mn)
    absmax = torch.maximum(torch.minimum(mn, zero).abs(), torch.maximum(mx, zero))
    scale = absmax / FP8_MAX  # ct: bit_range (448 - -448) / 2
    scale = torch.where(scale == 0, torch.tensor(_eps(scale.dtype), dtype=scale.dtype, device=scale.device), scale)
    return scale.to(scale_dtype)


def _as_scale(scale, shape: tuple[int, ...], what: str, scale_dtype: torch.dtype) -> Tensor:
    s = torch.as_tensor(scale)
    if s.numel() == 1 and len(shape) == 1 and shape[0] == 1:
        s = s.reshape(1)
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {list(s.shape)}, expected {list(shape)}")
    if not s.dtype.is_floating_point:
        s = s.to(torch.float32)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"{what} must be finite and > 0")
    return s.to(scale_dtype)


def _as_zero_point(zp, shape: tuple[int, ...], num_bits: int) -> Tensor:
    z = torch.as_tensor(zp)
    if tuple(z.shape) != tuple(shape):
        raise ValueError(f"zero point has shape {list(z.shape)}, expected {list(shape)}")
    if z.dtype.is_floating_point and not bool((z == torch.round(z)).all()):
        raise ValueError("zero points must be integers")
    qmin, qmax = int_range(num_bits)
    if z.numel() and (int(z.min()) < qmin or int(z.max()) > qmax):
        raise ValueError(f"zero points outside the signed {num_bits}-bit range [{qmin}, {qmax}]")
    return z.to(torch.int8)


def _scale_shape(n: int, k: int, strategy: str, group_size: int | None) -> tuple[int, ...]:
    return {"tensor": (1,), "channel": (n, 1)}.get(strategy) or (n, k // group_size)


# -- codes ------------------------------------------------------------------------------------
def int_codes(w: Tensor, scale: Tensor, zero_point: Tensor | None, num_bits: int) -> Tensor:
    """Signed int8 codes [N, K] = round(clamp(w / scale + zp)); scale/zp [1], [N, 1] or [N, G].

    Like ct's `_quantize`: `w / scale` in promote(w, scale) dtype, zp added in w's dtype."""
    n, k = w.shape
    g = scale.shape[-1] if scale.ndim == 2 else 1
    if k % g:
        raise ValueError(f"width {k} is not divisible into {g} groups")
    x = w.view(n, g, k // g) if scale.ndim == 2 else w
    s = scale.unsqueeze(-1) if scale.ndim == 2 else scale
    scaled = x / s
    if zero_point is not None:
        z = zero_point.unsqueeze(-1) if zero_point.ndim == 2 else zero_point
        scaled = scaled + z.to(w.dtype)
    qmin, qmax = int_range(num_bits)
    return torch.round(torch.clamp(scaled, qmin, qmax)).reshape(n, k).to(torch.int8)


def fp8_codes(w: Tensor, scale: Tensor) -> Tensor:
    """float8_e4m3fn [N, K] = cast(clamp(w / scale, ±448)); saturating, never NaN."""
    return torch.clamp(w / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# -- per-format quantizers --------------------------------------------------------------------
def quantize_fp8(w: Tensor, strategy: str = "channel", *, scale=None, input_scale=None,
                 scale_dtype: torch.dtype = SCALE_DTYPE) -> FloatQuantized:
    """FP8 E4M3 weights with a per-channel [N, 1] or per-tensor [1] scale (absmax/448 unless given).
    `input_scale` (static activations: calibrated absmax(x)/448) is stored as [1]."""
    _check_weight(w)
    if strategy not in ("channel", "tensor"):
        raise ValueError(f"FP8 strategy {strategy!r} (allowed: channel, tensor)")
    n, _ = w.shape
    shape = (n, 1) if strategy == "channel" else (1,)
    s = fp8_scale(w, strategy, scale_dtype=scale_dtype) if scale is None \
        else _as_scale(scale, shape, "weight scale", scale_dtype)
    i = None if input_scale is None else _as_scale(input_scale, (1,), "input scale", scale_dtype)
    return FloatQuantized(weight=fp8_codes(w, s), weight_scale=s, input_scale=i)


def quantize_int8(w: Tensor, *, scale=None, scale_dtype: torch.dtype = SCALE_DTYPE) -> IntQuantized:
    """INT8 W8A8 weights: symmetric per output channel, scale absmax/127.5 unless given."""
    _check_weight(w)
    n, _ = w.shape
    if scale is None:
        s, _ = int_qparams(*minmax(w, "channel"), 8, True, scale_dtype=scale_dtype)
    else:
        s = _as_scale(scale, (n, 1), "weight scale", scale_dtype)
    return IntQuantized(weight=int_codes(w, s, None, 8), weight_scale=s)


def pack_int(q_codes: Tensor, scale: Tensor, zero_point: Tensor | None, num_bits: int) -> PackQuantized:
    """Store integer codes [N, K] (signed, from RTN, GPTQ or AWQ) with their scale [N, G] (G = 1 for
    channel) and optional signed zero point [N, G] in the pack-quantized layout."""
    if q_codes.ndim != 2 or q_codes.dtype.is_floating_point:
        raise ValueError(f"expected 2-D integer codes, got {q_codes.dtype} {list(q_codes.shape)}")
    n, k = q_codes.shape
    if scale.ndim != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"scale shape {list(scale.shape)} does not fit codes {[n, k]}")
    packed_zp = None
    if zero_point is not None:
        z = _as_zero_point(zero_point, tuple(scale.shape), num_bits)
        packed_zp = pack_to_int32(z, num_bits, packed_dim=0)
    return PackQuantized(weight_packed=pack_to_int32(q_codes, num_bits), weight_scale=scale,
                         weight_shape=torch.tensor([n, k], dtype=torch.int64),
                         weight_zero_point=packed_zp)


def quantize_pack(w: Tensor, num_bits: int, *, group_size: int | None = None, symmetric: bool = True,
                  scale=None, zero_point=None, scale_dtype: torch.dtype = SCALE_DTYPE) -> PackQuantized:
    """Weight-only INT (4 or 8 bits), per group of `group_size` inputs or per channel (None),
    round-to-nearest with ct's min-max parameters unless `scale` (and `zero_point`) are given."""
    _check_weight(w)
    n, k = w.shape
    strategy = "group" if group_size else "channel"
    if group_size and k % group_size:
        raise ValueError(f"width {k} is not divisible by group size {group_size}")
    if scale is None:
        s, z = int_qparams(*minmax(w, strategy, group_size), num_bits, symmetric, scale_dtype=scale_dtype)
    else:
        s = _as_scale(scale, _scale_shape(n, k, strategy, group_size), "weight scale", scale_dtype)
        if symmetric != (zero_point is None):
            raise ValueError("pass a zero point exactly when the scheme is asymmetric")
        z = None if zero_point is None else _as_zero_point(zero_point, tuple(s.shape), num_bits)
    return pack_int(int_codes(w, s, z, num_bits), s, z, num_bits)
