"""Dequantizers written for torch.compile: one broadcast expression per GGML type (and `ct_scaled*` for
compressed-tensors weights), which inductor turns into one fused, vectorized C++ loop over the output
(read the packed bytes, write the result once).

The eager kernels in `dequantize.py` are the plain path: ~10-20 torch ops per chunk, each a pass
over memory. These expressions are slower than that run eagerly (every intermediate is built at full
size) and only pay off compiled; `dequantize(..., compiled=True)` uses them on the CPU. Not on
CUDA: inductor generates Triton there, and these kernels promise to need no Triton.

Every expression keeps gguf-py's float32 association (`d * q`, `(d*sc)*q - dmin*m`, `d*q + m`);
inductor's C++ is built with -ffp-contract=off, so no product is fused into an FMA, and the tests
check the compiled output bit-equal to gguf's numpy dequantizers.

Written for inductor's vectorizer: the innermost dimension is a contiguous run of the block's bytes;
low/high nibbles, quarters and bit planes are chosen with `where` on small constant masks over outer
dimensions (a stack or cat is materialized as its own pass; a shift by a per-element amount leaves
the loop scalar). Inputs: `b`, the [nb, nbytes] uint8 blocks, and `f`, the same memory viewed as
float16 (every block size and f16 field offset is even), so f16 fields are plain loads; each kernel
writes `out`, [nb, block] float32. Each is its own function (its own code object) so that dynamo
caches one compiled graph per type.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gemmaquant.numerics.ggml.fields import get_scale_min_k4
from gemmaquant.numerics.ggml.types import GGMLType

Fused = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def _store(out: torch.Tensor, values: torch.Tensor) -> None:
    """Write `values` (any shape with out's element order) into `out`: inductor fuses the copy into
    the loop's store, so the float32 output is written once."""
    out.view(values.shape).copy_(values)


def _sel(*conds_and_values: torch.Tensor) -> torch.Tensor:
    """where(c0, v0, where(c1, v1, ... vN)): selects per outer index without a concat (inductor
    materializes stack/cat; a select on a constant mask stays in the one vectorized loop)."""
    *pairs, last = conds_and_values
    out = last
    for i in range(len(pairs) - 2, -1, -2):
        out = torch.where(pairs[i], pairs[i + 1], out)
    return out


def _const(values: list[int], shape: tuple[int, ...], device: torch.device, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).view(shape)


def _lohi(qs: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Low nibbles where `lo`, high nibbles elsewhere, of int32 bytes broadcast over `lo`."""
    return torch.where(lo, qs & 0x0F, qs >> 4)


def _lo(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[True, False] along the size-2 dimension of `shape`: low nibbles first, then high."""
    return _const([1, 0], shape, device, torch.bool)


def _q8_0(b, f, out):
    _store(out, f[:, 0:1].float() * b[:, 2:].view(torch.int8).float())  # gguf: d * x


def _q4_0(b, f, out):  # [nb, 2, 16]
    _store(out, f[:, 0:1, None].float() * (_lohi(b[:, None, 2:].int(), _lo((1, 2, 1), b.device)) - 8).float())


def _q4_1(b, f, out):  # gguf: (d * q) + m
    q = _lohi(b[:, None, 4:].int(), _lo((1, 2, 1), b.device))
    _store(out, f[:, 0:1, None].float() * q.float() + f[:, 1:2, None].float())


def _bit4(b: torch.Tensor, offset: int) -> torch.Tensor:
    """Q5_0/Q5_1: bit j (j = 16*half + l) of the u32 at `offset` moved to bit 4, [nb, 2, 16]. Tested
    with a constant per-lane mask: a per-lane shift amount leaves inductor's loop scalar."""
    q = b[:, offset : offset + 4].int()
    qh = (q[:, 0:1] | (q[:, 1:2] << 8) | (q[:, 2:3] << 16) | (q[:, 3:4] << 24))[:, :, None]
    mask = _const([1 << j if j < 31 else -(1 << 31) for j in range(32)], (1, 2, 16), b.device)
    return ((qh & mask) != 0).int() << 4


def _q5_0(b, f, out):
    q = _lohi(b[:, None, 6:].int(), _lo((1, 2, 1), b.device)) | _bit4(b, 2)
    _store(out, f[:, 0:1, None].float() * (q - 16).float())


def _q5_1(b, f, out):
    q = _lohi(b[:, None, 8:].int(), _lo((1, 2, 1), b.device)) | _bit4(b, 4)
    _store(out, f[:, 0:1, None].float() * q.float() + f[:, 1:2, None].float())


def _k_scales(b: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: (d*sc, dmin*m) as float32 [nb, 4, 2, 1] (sub-block 2c + n at [c, n]), with the
    6-bit scales and mins of get_scale_min_k4 (a small pass of its own: 8 values per 256 weights)."""
    sc, m = get_scale_min_k4(b[:, 4:16].int())
    sc, m = sc.float(), m.float()
    shape = (-1, 4, 2, 1)
    return (f[:, 0:1].float() * sc).view(shape), (f[:, 1:2].float() * m).view(shape)  # gguf: d*sc, dmin*m


def _q4_k(b, f, out):  # [nb, 4, 2, 32]: chunk c of 32 bytes gives sub-blocks 2c (low), 2c+1 (high)
    d, dm = _k_scales(b, f)
    q = _lohi(b[:, 16:].int().view(-1, 4, 1, 32), _lo((1, 1, 2, 1), b.device))
    _store(out, d * q.float() - dm)  # gguf: d * q - dm


def _q5_k(b, f, out):  # sub-block s = 2c + n also takes bit s of qh[l] as bit 4
    d, dm = _k_scales(b, f)
    bit = _const([1 << s for s in range(8)], (1, 4, 2, 1), b.device)
    ql = _lohi(b[:, 48:].int().view(-1, 4, 1, 32), _lo((1, 1, 2, 1), b.device))
    qh = b[:, 16:48].int().view(-1, 1, 1, 32)
    _store(out, d * (ql | (((qh & bit) != 0).int() << 4)).float() - dm)


def _q6_k(b, f, out):  # [nb, half, t, 32]
    """Per 128-weight half and quarter t: ql[64h + 32(t%2) + l] >> 4(t//2), bits 2t of qh[32h + l]."""
    t = _const([0, 1, 2, 3], (1, 1, 4, 1), b.device)
    ql = b[:, :128].int().view(-1, 2, 2, 1, 32)
    ql = _lohi(torch.where(t % 2 == 0, ql[:, :, 0], ql[:, :, 1]), t < 2)
    qh = b[:, 128:192].int().view(-1, 2, 1, 32)
    qh = _sel(t == 0, qh & 3, t == 1, (qh >> 2) & 3, t == 2, (qh >> 4) & 3, qh >> 6)
    q = ((ql | (qh << 4)) - 32).float().view(-1, 2, 4, 2, 16)
    d = f[:, 104:105].float() * b[:, 192:208].view(torch.int8).float()  # gguf: d * scales
    _store(out, d.view(-1, 2, 4, 2, 1) * q)


def _f16_all(b, f, out):
    _store(out, f.float())


def _bf16(b, f, out):
    _store(out, f.view(torch.bfloat16).float())


FUSED: dict[GGMLType, Fused] = {
    GGMLType.F16: _f16_all,
    GGMLType.BF16: _bf16,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}


# compressed-tensors: w = (q - zp) * scale in the scale's dtype (see numerics/ct/dequantize.py). Codes and
# q - zp are exact in bf16/f16/f32 and their product with the scale is exact in float32, so computing
# in float32 and rounding once to the scale's dtype gives the bits of ct's bf16 arithmetic.
def ct_scaled(q, scale):  # q [R, C], scale [1] or [R, 1] (groups come as rows of a reshaped q)
    return (q.float() * scale.float()).to(scale.dtype)


def ct_scaled_zp(q, scale, zp):
    return ((q.float() - zp.float()) * scale.float()).to(scale.dtype)
