"""Q4_K, Q5_K and Q6_K block quantizers (`quantize_row_q{4,5,6}_K_ref` / `_impl` in ggml-quants.c).

Each function takes the blocks of a row chunk, `x [nb, 256]` float32, and the importance weights
tiled to the same shape (`qw`, or None for the reference path), and returns `[nb, bytes]` uint8
blocks identical to ggml's. Sub-blocks are processed in the `[P, M]` layout of `search.py`, with
M = nb * sub-blocks per block, block-major.
"""

from __future__ import annotations

import torch

from gemmaquant.numerics.ggml.fields import fp16_bytes, get_scale_min_k4
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
