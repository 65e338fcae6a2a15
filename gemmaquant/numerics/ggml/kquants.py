"""Q4_K, Q5_K and Q6_K: quantizers byte-identical to `quantize_row_q{4,5,6}_K_ref` / `_impl` in
ggml-quants.c, eager and fused dequantizers bit-equal to gguf-py.

Quantizers take the blocks of a row chunk, `x [nb, 256]` float32, and the importance weights tiled
to the same shape (`qw`, or None for the reference path), and return `[nb, bytes]` uint8 blocks
identical to ggml's. Sub-blocks are processed in the `[P, M]` layout of `search.py`, with
M = nb * sub-blocks per block, block-major. Dequantizers write gguf-py's float32 expressions:
Q4_K/Q5_K `(d*sc)*q - dmin*m` (two roundings per weight, never an FMA), Q6_K `(d*sc)*(q - 32)`.
"""

from __future__ import annotations

import torch

from gemmaquant.numerics.ggml.eager import BIT4, BITS45, LO4, nibbles, shifted, words
from gemmaquant.numerics.ggml.family import GGMLKernels, per_block
from gemmaquant.numerics.ggml.fields import f16, fp16_bytes, get_scale_min_k4
from gemmaquant.numerics.ggml.fused import const, lo_first, lohi, select, store
from gemmaquant.numerics.ggml.search import (
    GROUP_MAX_EPS,
    div,
    first_abs_max,
    make_qkx,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    seq_sum,
    sqrt,
)
from gemmaquant.numerics.ggml.types import QK_K, GGMLType


def _columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """[nb, 256] -> [width, nb * 256 / width]: one column per sub-block."""
    return x.reshape(-1, width).T.contiguous()


def quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Q6_K: 16 sub-blocks of 16, int8 sub-scales, x = d * sc * (q - 32)."""
    nb = x.shape[0]
    xs = _columns(x, 16)  # [16, nb*16]
    # The imatrix path passes the raw importance as the weights of make_qx_quants.
    scales, L = make_qx_quants(xs, 32, None if qw is None else _columns(qw, 16))
    per_block = scales.view(nb, 16)
    max_abs, max_scale = first_abs_max(per_block.T)
    iscale = div(-128.0, max_scale)  # [nb]
    d16 = div(1.0, iscale).to(torch.float16)
    sc = nearest_int(iscale[:, None] * per_block).clamp_(max=127).to(torch.int8)  # [nb, 16]
    d = (d16.float()[:, None] * sc.float()).reshape(-1)  # [nb*16]
    q = nearest_int(div(xs, d)).clamp_(-32, 31) + 32
    L = torch.where(d != 0, q, L)  # d == 0: keep make_qx_quants' codes (0 for a zero sub-block)

    # ql/qh packing, per 128-weight half h: quarters q1..q4 = L[128h + 32k + l].
    Lq = L.T.reshape(nb, 2, 4, 32).to(torch.uint8)
    q1, q2, q3, q4 = Lq.unbind(2)
    ql = torch.cat([(q1 & 15) | ((q3 & 15) << 4), (q2 & 15) | ((q4 & 15) << 4)], dim=2)  # [nb, 2, 64]
    qh = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)  # [nb, 2, 32]
    out = torch.cat(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(torch.uint8), fp16_bytes(d16.float())], dim=1
    )
    return out.masked_fill_((max_abs < GROUP_MAX_EPS)[:, None], 0)  # near-zero block: 210 zero bytes


def _pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """[8, nb] 6-bit scales and mins (int32 byte values) -> [12, nb] bytes, as ggml stores them."""
    s = torch.empty((12, ls.shape[1]), dtype=torch.int32, device=ls.device)
    s[0:4] = ls[0:4] | ((ls[4:8] >> 4) << 6)
    s[4:8] = lm[0:4] | ((lm[4:8] >> 4) << 6)
    s[8:12] = (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4)
    return s & 0xFF  # uint8_t stores


def _unpack_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: [12, nb] bytes -> (sc [8, nb], m [8, nb])."""
    sc, m = get_scale_min_k4(s.T)
    return sc.T, m.T


def quantize_q45_k(x: torch.Tensor, qw: torch.Tensor | None, nmax: int) -> torch.Tensor:
    """Q4_K (nmax 15) / Q5_K (nmax 31): 8 sub-blocks of 32, x = d*sc*q - dmin*m."""
    nb = x.shape[0]
    xs = _columns(x, 32)  # [32, nb*8]
    if qw is None:
        av_x = sqrt(div(seq_sum(xs * xs), 32.0))
        w = av_x + xs.abs()
        if nmax == 15:
            scales, mins, L = make_qkx(xs, w, 15, -1.0, 0.1, 20, qkx3=False)
        else:
            scales, mins, L = make_qkx(xs, w, 31, -0.5, 0.1, 15, qkx3=False)
        sv, mv = scales.view(nb, 8).T, mins.view(nb, 8).T  # [8, nb]
        max_scale = torch.zeros(nb, device=x.device)  # +0.0: an all-zero block keeps dmin 0x0000
        max_min = torch.zeros(nb, device=x.device)
        for j in range(8):
            max_scale = torch.where(sv[j] > max_scale, sv[j], max_scale)
            max_min = torch.where(mv[j] > max_min, mv[j], max_min)
        inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), 0.0)
        inv_min = torch.where(max_min > 0, div(63.0, max_min), 0.0)
        ls = (nearest_int(inv_scale * sv) & 0xFF).clamp_(max=63)
        lm = (nearest_int(inv_min * mv) & 0xFF).clamp_(max=63)
        d16 = div(max_scale, 63.0).to(torch.float16)
        dmin16 = div(max_min, 63.0).to(torch.float16)
    else:
        x256 = x.T.contiguous()  # [256, nb]
        sigma2 = div(2.0 * seq_sum(x256 * x256), 256.0)  # 2*sum_x2/QK_K over the whole block
        sigma2 = sigma2.repeat_interleave(8)  # [nb*8]
        w = _columns(qw, 32) * sqrt(sigma2 + xs * xs)
        sw = seq_sum(w).view(nb, 8).T
        scales, mins, L = make_qkx(xs, w, nmax, -0.9, 0.05, 36, qkx3=True)
        d_blk, ls = make_qp_quants(scales.view(nb, 8).T, sw, 63)
        m_blk, lm = make_qp_quants(mins.view(nb, 8).T, sw, 63)
        if nmax == 31:  # only the Q5_K impl clamps; Q4_K packs the uint8 as is
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        d16, dmin16 = d_blk.to(torch.float16), m_blk.to(torch.float16)

    packed = _pack_scales(ls, lm)  # [12, nb]
    sc, m = _unpack_scales(packed)
    d = (d16.float() * sc.float()).T.reshape(-1)  # [nb*8]
    dm = (dmin16.float() * m.float()).T.reshape(-1)
    q = nearest_int(div(xs + dm, d)).clamp_(0, nmax)
    L = torch.where(d != 0, q, L)  # d == 0: keep the search's codes

    Lq = L.T.reshape(nb, 4, 2, 32).to(torch.uint8)  # [block, 64-chunk c, half, l]
    lo, hi = Lq[:, :, 0], Lq[:, :, 1]
    qs = ((lo & 15) | ((hi & 15) << 4)).reshape(nb, 128)
    parts = [fp16_bytes(d16.float()), fp16_bytes(dmin16.float()), packed.T.to(torch.uint8)]
    if nmax == 31:
        # qh[l]: bit 2c = bit 4 of L[64c + l], bit 2c+1 = bit 4 of L[64c + 32 + l].
        qh = torch.zeros((nb, 32), dtype=torch.uint8, device=x.device)
        for c in range(4):
            qh |= ((lo[:, c] >> 4) << (2 * c)) | ((hi[:, c] >> 4) << (2 * c + 1))
        parts.append(qh)
    parts.append(qs)
    return torch.cat(parts, dim=1)


def quantize_q4_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    return quantize_q45_k(x, qw, 15)


def quantize_q5_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    return quantize_q45_k(x, qw, 31)


# --- dequantize (eager) -----------------------------------------------------------------------


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: (d*sc, dmin*m) as float32 [nb, 8, 1]."""
    sc, m = get_scale_min_k4(b[:, 4:16].int())
    s = torch.stack([sc, m], dim=1).float()  # [nb, 2, 8]
    s *= f16(b, 0, 2)[:, :, None]  # gguf: d * sc, dmin * m
    return s[:, 0, :, None], s[:, 1, :, None]


def dequantize_q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    d, dm = _k_scales(b)
    out.copy_(nibbles(words(b[:, 16:]).view(-1, 4, 4)).view(torch.uint8).view(out.shape))
    out.view(-1, 8, 32).mul_(d).sub_(dm)  # gguf: d * q - dm


def dequantize_q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    d, dm = _k_scales(b)
    w = words(b[:, 16:])  # [nb, 20]: qh[32] then qs[128]
    qs, qh = w[:, 4:].view(nb, 4, 4), w[:, :4]  # [block, 32-byte chunk c, word], [block, word]
    # qh[l] bit j is bit 4 of weight 32j + l; sub-block 2c takes the low nibbles of chunk c and
    # bit 2c, sub-block 2c+1 the high nibbles and bit 2c+1. Per chunk, bit 2c is moved to bit 4
    # (and so bit 2c+1 to bit 5) before the nibbles are interleaved.
    qhc = shifted(qh, (4, 2, 0, -2), dim=1)  # [block, c, word]
    lo = (qs & LO4).bitwise_or_(qhc & BIT4)
    hi = (qs >> 4).bitwise_and_(LO4).bitwise_or_((qhc >> 1).bitwise_and_(BIT4))
    q = torch.stack([lo, hi], dim=2).view(torch.uint8)  # [block, c, lo|hi, 32]
    out.copy_(q.view(out.shape))
    out.view(nb, 8, 32).mul_(d).sub_(dm)


def dequantize_q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """Per 128-weight half h and l < 32, the quarters k = 0..3 (weights 128h + 32k + l) take the low
    nibble of ql[64h + l], of ql[64h + 32 + l], the high nibbles of the same, and bits 2k..2k+1 of
    qh[32h + l] as bits 4..5; the code minus 32 times d*scale[sub-block of 16]."""
    nb = b.shape[0]
    w = words(b[:, :192])  # [nb, 24]: ql[128] then qh[64]
    ql, qh = w[:, :16].view(nb, 2, 8), w[:, 16:].view(nb, 2, 1, 4)  # [block, half, word]
    # Per half, qh2 = [qh << 2, qh] for ql parts 0 | 1: `qh2 << 2` then holds bits 0-1 | 2-3 at
    # bits 4-5 (for the low nibbles), `qh2 >> 2` bits 4-5 | 6-7 (for the high nibbles); the
    # sign fill of the arithmetic >> lands only in bits the masks drop.
    qh2 = torch.cat([qh << 2, qh], dim=2).view(nb, 2, 8)
    lo = (ql & LO4).bitwise_or_((qh2 << 2).bitwise_and_(BITS45))  # quarters 0, 1
    hi = (ql >> 4).bitwise_and_(LO4).bitwise_or_((qh2 >> 2).bitwise_and_(BITS45))  # quarters 2, 3
    q = torch.stack([lo, hi], dim=2).view(torch.int8)  # [block, half, lo|hi, 64]
    scale = b[:, 192:208].view(torch.int8).float().mul_(f16(b, 208, 1))  # gguf: d * scales
    out.copy_(q.view(out.shape).sub_(32))
    out.view(nb, 16, 16).mul_(scale[:, :, None])


# --- dequantize (fused, for torch.compile) ----------------------------------------------------


def _fused_k_scales(b: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: (d*sc, dmin*m) as float32 [nb, 4, 2, 1] (sub-block 2c + n at [c, n]), with the
    6-bit scales and mins of get_scale_min_k4 (a small pass of its own: 8 values per 256 weights)."""
    sc, m = get_scale_min_k4(b[:, 4:16].int())
    sc, m = sc.float(), m.float()
    shape = (-1, 4, 2, 1)
    return (f[:, 0:1].float() * sc).view(shape), (f[:, 1:2].float() * m).view(shape)  # gguf: d*sc, dmin*m


def fused_q4_k(b, f, out):  # [nb, 4, 2, 32]: chunk c of 32 bytes gives sub-blocks 2c (low), 2c+1 (high)
    d, dm = _fused_k_scales(b, f)
    q = lohi(b[:, 16:].int().view(-1, 4, 1, 32), lo_first((1, 1, 2, 1), b.device))
    store(out, d * q.float() - dm)  # gguf: d * q - dm


def fused_q5_k(b, f, out):  # sub-block s = 2c + n also takes bit s of qh[l] as bit 4
    d, dm = _fused_k_scales(b, f)
    bit = const([1 << s for s in range(8)], (1, 4, 2, 1), b.device)
    ql = lohi(b[:, 48:].int().view(-1, 4, 1, 32), lo_first((1, 1, 2, 1), b.device))
    qh = b[:, 16:48].int().view(-1, 1, 1, 32)
    store(out, d * (ql | (((qh & bit) != 0).int() << 4)).float() - dm)


def fused_q6_k(b, f, out):  # [nb, half, t, 32]
    """Per 128-weight half and quarter t: ql[64h + 32(t%2) + l] >> 4(t//2), bits 2t of qh[32h + l]."""
    t = const([0, 1, 2, 3], (1, 1, 4, 1), b.device)
    ql = b[:, :128].int().view(-1, 2, 2, 1, 32)
    ql = lohi(torch.where(t % 2 == 0, ql[:, :, 0], ql[:, :, 1]), t < 2)
    qh = b[:, 128:192].int().view(-1, 2, 1, 32)
    qh = select(t == 0, qh & 3, t == 1, (qh >> 2) & 3, t == 2, (qh >> 4) & 3, qh >> 6)
    q = ((ql | (qh << 4)) - 32).float().view(-1, 2, 4, 2, 16)
    d = f[:, 104:105].float() * b[:, 192:208].view(torch.int8).float()  # gguf: d * scales
    store(out, d.view(-1, 2, 4, 2, 1) * q)


TYPES = {
    GGMLType.Q4_K: GGMLKernels(per_block(quantize_q4_k, QK_K), dequantize_q4_k, fused_q4_k, compiled_search=True),
    GGMLType.Q5_K: GGMLKernels(per_block(quantize_q5_k, QK_K), dequantize_q5_k, fused_q5_k, compiled_search=True),
    GGMLType.Q6_K: GGMLKernels(per_block(quantize_q6_k, QK_K), dequantize_q6_k, fused_q6_k, compiled_search=True),
}
