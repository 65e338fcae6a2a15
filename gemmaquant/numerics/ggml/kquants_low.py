"""Q2_K and Q3_K: quantizers byte-identical to `ggml_quantize_chunk`, dequantizers bit-equal to gguf-py.

Quantizers take the blocks of a row chunk, `x [nb, 256]` float32, and the importance weights tiled
to the same shape (`qw`, None for llama.cpp's reference path), and return `[nb, bytes]` uint8.
Sub-blocks of 16 are processed in the `[P, M]` layout of `search.py` (M = nb * 16, block-major).
Both types first search a float scale per sub-block, then quantize those scales to small integers
and an fp16 super-scale, and finally re-round every weight against the *stored* scales (a
sub-block whose stored scale is 0 keeps its search codes, as ggml does).

Dequantizers `(b [nb, bytes] uint8, out [nb, 256] float32)` write gguf-py's float32 expressions:
Q2_K `(d*sc)*q - dmin*m`, Q3_K `(d*(sc-32))*q`.
"""

from __future__ import annotations

import torch

from gemmaquant.numerics.ggml.fields import f16, fp16_bytes
from gemmaquant.numerics.ggml.search import (
    div,
    first_abs_max,
    make_q3_quants,
    make_qkx,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    seq_sum,
    sqrt,
)
from gemmaquant.numerics.ggml.family import GGMLKernels, per_block
from gemmaquant.numerics.ggml.types import QK_K, GGMLType

SUB = 16  # weights per sub-block
NSUB = 16  # sub-blocks per 256 block


def sub_blocks(x: torch.Tensor) -> torch.Tensor:
    """[nb, 256] -> [16, nb*16]: one column per sub-block of 16."""
    return x.reshape(-1, SUB).T.contiguous()


def pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """[nb, 256] codes (low 2 bits used) -> [nb, 64] bytes: byte 32h + l holds weights
    128h + 32k + l at bits 2k..2k+1 (the qs field of Q2_K and Q3_K)."""
    q = (L & 3).to(torch.uint8).view(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_2bit`: [nb, 64] bytes -> [nb, 256] codes 0..3 (uint8)."""
    q = qs.reshape(-1, 2, 1, 32)
    return (torch.cat([q, q >> 2, q >> 4, q >> 6], dim=2) & 3).reshape(-1, 256)


def _running_max(v: torch.Tensor) -> torch.Tensor:
    """`float m = 0; for j: if (v[j] > m) m = v[j];` over dim 0 of [16, nb]."""
    m = torch.zeros_like(v[0])
    for j in range(v.shape[0]):
        m = torch.where(v[j] > m, v[j], m)
    return m


def _sigma2_sub(x: torch.Tensor, factor: float) -> torch.Tensor:
    """factor * Σx² over each 256 block / 256, repeated for its 16 sub-blocks: [nb*16]."""
    xt = x.T.contiguous()
    return div(factor * seq_sum(xt * xt), 256.0).repeat_interleave(NSUB)


def quantize_q2_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Q2_K: 16 sub-blocks of 16, 4-bit scales and mins, x = (d*sc)*q - dmin*m, q in 0..3."""
    nb = x.shape[0]
    xs = sub_blocks(x)  # [16, nb*16]
    if qw is None:
        # quantize_row_q2_K_ref: mean-absolute-error search weighted by |x|
        scales, mins, L = make_qkx(xs, xs.abs(), 3, -0.5, 0.1, 15, qkx3=False, use_mad=True)
        sv, mv = scales.view(nb, NSUB).T, mins.view(nb, NSUB).T  # [16, nb]
        max_scale, max_min = _running_max(sv), _running_max(mv)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = nearest_int(div(15.0, max_scale) * sv) & 0xFF  # uint8 store
        lm = nearest_int(div(15.0, max_min) * mv)
        ls = torch.where(has_s, ls, 0)
        packed = torch.where(has_m, (ls | (lm << 4)) & 0xFF, ls)
        d16 = torch.where(has_s, div(max_scale, 15.0), 0.0).to(torch.float16)
        dmin16 = torch.where(has_m, div(max_min, 15.0), 0.0).to(torch.float16)
    else:
        # quantize_row_q2_K_impl: w = qw*sqrt(sigma2 + x²), sigma2 = Σx²/256 over the block
        w = sub_blocks(qw) * sqrt(_sigma2_sub(x, 1.0) + xs * xs)
        sw = seq_sum(w).view(nb, NSUB).T
        scales, mins, L = make_qkx(xs, w, 3, -0.9, 0.05, 36, qkx3=True)
        dm, ls = make_qp_quants(scales.view(nb, NSUB).T, sw, 15)
        mm, lm = make_qp_quants(mins.view(nb, NSUB).T, sw, 15)
        packed = (ls | (lm << 4)) & 0xFF
        d16, dmin16 = dm.to(torch.float16), mm.to(torch.float16)

    # Re-round against the stored scales: d*(sc & 15) and dmin*(sc >> 4), per sub-block.
    d = (d16.float()[None, :] * (packed & 15).float()).T.reshape(-1)  # [nb*16]
    dm = (dmin16.float()[None, :] * (packed >> 4).float()).T.reshape(-1)
    q = nearest_int(div(xs + dm, d)).clamp_(0, 3)
    L = torch.where(d != 0, q, L)  # d == 0: keep the search's codes

    return torch.cat(
        [packed.T.to(torch.uint8), pack_2bit(L.T.reshape(nb, 256)), fp16_bytes(d16.float()), fp16_bytes(dmin16.float())],
        dim=1,
    )


def _pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """[16, nb] 6-bit scales (0..63) -> [nb, 12] bytes: low nibbles of 0..7 | 8..15 in bytes 0..7,
    the top 2 bits of scale j at bits 2*(j/4) of byte 8 + j%4."""
    lo = (l[0:8] & 15) | ((l[8:16] & 15) << 4)  # [8, nb]
    hi = l >> 4  # [16, nb]
    top = hi[0:4] | (hi[4:8] << 2) | (hi[8:12] << 4) | (hi[12:16] << 6)  # [4, nb]
    return torch.cat([lo, top]).T.to(torch.uint8)


def quantize_q3_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Q3_K: 16 sub-blocks of 16, signed 6-bit scales, x = (d*(sc-32))*(q-4), q in 0..7."""
    nb = x.shape[0]
    xs = sub_blocks(x)  # [16, nb*16]
    if qw is None:
        # quantize_row_q3_K_ref: make_q3_quants per sub-block, scales relative to the largest |scale|
        scales, L = make_q3_quants(xs, 4)
        per = scales.view(nb, NSUB).T  # [16, nb]
        _, max_scale = first_abs_max(per)
        live = max_scale != 0
        iscale = div(-32.0, max_scale)
        l = nearest_int(iscale * per)
        l = ((l + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
        l = torch.where(live, l.clamp_(-32, 31) + 32, 0)  # all-zero scales: the memset bytes
        d16 = torch.where(live, div(1.0, iscale), 0.0).to(torch.float16)
    else:
        # quantize_row_q3_K_impl: w = qw*sqrt(sigma2 + x²), sigma2 = 2Σx²/256; the 16 scales are
        # themselves quantized by make_qx_quants(nmax 32) weighted by each sub-block's Σw.
        w = sub_blocks(qw) * sqrt(_sigma2_sub(x, 2.0) + xs * xs)
        sw = seq_sum(w).view(nb, NSUB).T
        scales, L = make_qx_quants(xs, 4, w)
        d_block, l = make_qx_quants(scales.view(nb, NSUB).T, 32, sw)
        d16 = d_block.to(torch.float16)

    # The packing keeps all 6 bits, so the stored sc - 32 is l - 32.
    d = (d16.float()[None, :] * (l - 32).float()).T.reshape(-1)  # [nb*16]
    q = nearest_int(div(xs, d)).clamp_(-4, 3) + 4
    L = torch.where(d != 0, q, L).T.reshape(nb, 256)  # d == 0: keep the search's codes

    # hmask: bit j/32 of byte j%32 is bit 2 of weight j's code; qs holds the low 2 bits.
    high = (L >> 2).to(torch.uint8).view(nb, 8, 32)
    hmask = torch.zeros((nb, 32), dtype=torch.uint8, device=x.device)
    for k in range(8):
        hmask |= high[:, k] << k
    return torch.cat([hmask, pack_2bit(L), _pack_q3_scales(l), fp16_bytes(d16.float())], dim=1)


def dequantize_q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    sc = b[:, :16]
    dl = f16(b, 80) * (sc & 15).float()  # gguf: d * (scales & 0xF)
    ml = f16(b, 82) * (sc >> 4).float()
    q = unpack_2bit(b[:, 16:80]).float().view(nb, 16, 16)
    out.view(nb, 16, 16).copy_(q.mul_(dl[:, :, None]).sub_(ml[:, :, None]))


def dequantize_q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    s = b[:, 96:108]
    low = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], dim=1)  # [nb, 16]
    top = s[:, 8:12]
    high = torch.stack([top, top >> 2, top >> 4, top >> 6], dim=1).reshape(nb, 16) & 3
    sc = (low | (high << 4)).to(torch.int8) - 32
    dl = f16(b, 108) * sc.float()  # gguf: d * (sc - 32)
    hm = b[:, :32]
    hbit = torch.stack([hm >> k for k in range(8)], dim=1).reshape(nb, 256) & 1
    q = unpack_2bit(b[:, 32:96]).to(torch.int8) - ((hbit ^ 1) << 2).to(torch.int8)
    out.view(nb, 16, 16).copy_(q.float().view(nb, 16, 16).mul_(dl[:, :, None]))


TYPES = {
    GGMLType.Q2_K: GGMLKernels(per_block(quantize_q2_k, QK_K), dequantize_q2_k),
    GGMLType.Q3_K: GGMLKernels(per_block(quantize_q3_k, QK_K), dequantize_q3_k),
}
