"""Q8_0 and the legacy 32-weight types Q4_0, Q4_1, Q5_0, Q5_1: quantizers byte-identical to
`ggml_quantize_chunk`, eager and fused dequantizers bit-equal to gguf-py.

Without an imatrix ggml runs `quantize_row_q*_ref`, with one `quantize_row_q*_impl`, a weighted
search whose weights need the whole row (sigma2 is the row's mean square), so these quantizers
take rows, not blocks. Q8_0 ignores an imatrix, as ggml does. Dequantizers write gguf-py's float32
expressions: `d * q` (Q8_0, Q4_0, Q5_0), `(d * q) + m` (Q4_1, Q5_1).
"""

from __future__ import annotations

import torch

from gemmaquant.numerics.ggml.eager import nibbles, words
from gemmaquant.numerics.ggml.family import GGMLKernels, per_block, tile_imatrix
from gemmaquant.numerics.ggml.fields import f16, fp16_bytes
from gemmaquant.numerics.ggml.fused import const, lo_first, lohi, store
from gemmaquant.numerics.ggml.search import (
    div, first_abs_max, make_qkx, make_qx_quants, roundf, running_min_max, seq_sum, sqrt,
)
from gemmaquant.numerics.ggml.types import GGMLType

BLOCK = 32

# --- quantize ---------------------------------------------------------------------------------


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[nb, 32] codes -> [nb, 16] bytes: byte j = (q_j & 15) | (q_{j+16} & 15) << 4."""
    q = q.to(torch.uint8)
    return (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)


def _pack_qh(q: torch.Tensor) -> torch.Tensor:
    """[nb, 32] 5-bit codes -> [nb, 4] bytes of the little-endian u32 whose bit j is bit 4 of q_j."""
    bits = ((q >> 4) & 1).to(torch.uint8).view(-1, 4, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=q.device)
    return (bits * weights).sum(dim=2, dtype=torch.uint8)


def _pack_32(d: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor, bits: int) -> torch.Tensor:
    """d [, m] [, qh] qs, the field order of block_q{4,5}_{0,1}."""
    parts = [d] if m is None else [d, m]
    if bits == 5:
        parts.append(_pack_qh(q))
    parts.append(_pack_nibbles(q))
    return torch.cat(parts, dim=1)


def quantize_q8_0(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    amax = x.abs().amax(dim=1)
    d = div(amax, 127.0)
    inv = torch.where(d != 0, div(1.0, d), 0.0)
    qs = roundf(x * inv[:, None]).to(torch.int8)
    return torch.cat([fp16_bytes(d), qs.view(torch.uint8)], dim=1)


def _q4_0_q5_0_ref(x: torch.Tensor, bits: int) -> torch.Tensor:
    half = 1 << (bits - 1)  # 8 | 16
    amax, mx = first_abs_max(x.T.contiguous())  # the signed value of largest |x|, first index
    d = div(mx, float(-half))
    inv = torch.where(d != 0, div(1.0, d), 0.0)
    q = torch.trunc(x * inv[:, None] + (half + 0.5)).to(torch.int32).clamp_(max=2 * half - 1)
    return _pack_32(fp16_bytes(d), None, q, bits)


def _q4_1_q5_1_ref(x: torch.Tensor, bits: int) -> torch.Tensor:
    mn, mx = running_min_max(x.T.contiguous())
    d = div(mx - mn, float((1 << bits) - 1))
    inv = torch.where(d != 0, div(1.0, d), 0.0)
    q = torch.trunc((x - mn[:, None]) * inv[:, None] + 0.5).to(torch.int32)
    if bits == 4:
        q = q.clamp_(max=15)  # Q5_1 has no clamp in ggml
    return _pack_32(fp16_bytes(d), fp16_bytes(mn), q, bits)


def _impl(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor, bits: int, with_min: bool) -> torch.Tensor:
    """quantize_row_q{4,5}_{0,1}_impl: w = qw * sqrt(sigma2_row + x^2), then a weighted search."""
    xs = x.T.contiguous()  # [32, nb]
    w = qw.T.contiguous() * sqrt(sigma2 + xs * xs)
    if not with_min:
        d, L = make_qx_quants(xs, 1 << (bits - 1), w)
        return _pack_32(fp16_bytes(d), None, L.T, bits)
    d, the_min, L = make_qkx(xs, w, (1 << bits) - 1, -0.9, 0.05, 36, qkx3=True)
    return _pack_32(fp16_bytes(d), fp16_bytes(-the_min), L.T, bits)


def _row_quantizer(bits: int, with_min: bool):
    """Q4_0/Q5_0 (no min) or Q4_1/Q5_1: the reference search, or with an imatrix the weighted one."""

    def quantize_rows(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
        rows, n = x.shape
        blocks = x.reshape(-1, BLOCK)
        if imatrix is None:
            ref = _q4_1_q5_1_ref if with_min else _q4_0_q5_0_ref
            return ref(blocks, bits).reshape(rows, -1)
        xt = x.T.contiguous()
        sigma2 = div(seq_sum(xt * xt), float(n))  # over the whole row, then per block
        qw = tile_imatrix(imatrix, rows, BLOCK)
        return _impl(blocks, qw, sigma2.repeat_interleave(n // BLOCK), bits, with_min).reshape(rows, -1)

    return quantize_rows


# --- dequantize (eager) -----------------------------------------------------------------------

# Byte v -> the int64 word whose byte j has bit j of v at bit 4 (Q5_0/Q5_1 qh spreading).
_SPREAD = torch.tensor(
    [sum(((v >> j) & 1) << (8 * j + 4) for j in range(8)) for v in range(256)], dtype=torch.int64
)


def dequantize_q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b[:, 2:].view(torch.int8))
    out.mul_(f16(b, 0, 1))  # gguf: d * x


def dequantize_q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = nibbles(words(b[:, 2:]).view(-1, 1, 2)).view(torch.int8).view(out.shape).sub_(8)
    out.copy_(q)
    out.mul_(f16(b, 0, 1))


def dequantize_q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    dm = f16(b, 0, 2)
    out.copy_(nibbles(words(b[:, 4:]).view(-1, 1, 2)).view(torch.uint8).view(out.shape))
    out.mul_(dm[:, :1]).add_(dm[:, 1:])  # gguf: (d * q) + m


def _q5_codes(b: torch.Tensor, qh_at: int) -> torch.Tensor:
    """5-bit codes 0..31 of Q5_0/Q5_1 as [nb, 32] uint8: low nibbles from qs, bit 4 from qh, the
    little-endian u32 whose bit j is bit 4 of code j (spread by a byte -> word table)."""
    q = nibbles(words(b[:, qh_at + 4 :]).view(-1, 1, 2)).view(-1, 32).view(torch.int64)
    q |= _SPREAD.to(b.device)[b[:, qh_at : qh_at + 4].to(torch.int32)]
    return q.view(torch.uint8).view(-1, 32)


def dequantize_q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_q5_codes(b, 2).view(torch.int8).sub_(16))
    out.mul_(f16(b, 0, 1))


def dequantize_q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    dm = f16(b, 0, 2)
    out.copy_(_q5_codes(b, 4))
    out.mul_(dm[:, :1]).add_(dm[:, 1:])


# --- dequantize (fused, for torch.compile) ----------------------------------------------------


def fused_q8_0(b, f, out):
    store(out, f[:, 0:1].float() * b[:, 2:].view(torch.int8).float())  # gguf: d * x


def fused_q4_0(b, f, out):  # [nb, 2, 16]
    store(out, f[:, 0:1, None].float() * (lohi(b[:, None, 2:].int(), lo_first((1, 2, 1), b.device)) - 8).float())


def fused_q4_1(b, f, out):  # gguf: (d * q) + m
    q = lohi(b[:, None, 4:].int(), lo_first((1, 2, 1), b.device))
    store(out, f[:, 0:1, None].float() * q.float() + f[:, 1:2, None].float())


def _bit4(b: torch.Tensor, offset: int) -> torch.Tensor:
    """Q5_0/Q5_1: bit j (j = 16*half + l) of the u32 at `offset` moved to bit 4, [nb, 2, 16]. Tested
    with a constant per-lane mask: a per-lane shift amount leaves inductor's loop scalar."""
    q = b[:, offset : offset + 4].int()
    qh = (q[:, 0:1] | (q[:, 1:2] << 8) | (q[:, 2:3] << 16) | (q[:, 3:4] << 24))[:, :, None]
    mask = const([1 << j if j < 31 else -(1 << 31) for j in range(32)], (1, 2, 16), b.device)
    return ((qh & mask) != 0).int() << 4


def fused_q5_0(b, f, out):
    q = lohi(b[:, None, 6:].int(), lo_first((1, 2, 1), b.device)) | _bit4(b, 2)
    store(out, f[:, 0:1, None].float() * (q - 16).float())


def fused_q5_1(b, f, out):
    q = lohi(b[:, None, 8:].int(), lo_first((1, 2, 1), b.device)) | _bit4(b, 4)
    store(out, f[:, 0:1, None].float() * q.float() + f[:, 1:2, None].float())


TYPES = {
    GGMLType.Q8_0: GGMLKernels(per_block(quantize_q8_0, BLOCK, uses_imatrix=False), dequantize_q8_0, fused_q8_0),
    GGMLType.Q4_0: GGMLKernels(_row_quantizer(4, with_min=False), dequantize_q4_0, fused_q4_0, compiled_search=True),
    GGMLType.Q4_1: GGMLKernels(_row_quantizer(4, with_min=True), dequantize_q4_1, fused_q4_1, compiled_search=True),
    GGMLType.Q5_0: GGMLKernels(_row_quantizer(5, with_min=False), dequantize_q5_0, fused_q5_0, compiled_search=True),
    GGMLType.Q5_1: GGMLKernels(_row_quantizer(5, with_min=True), dequantize_q5_1, fused_q5_1, compiled_search=True),
}
