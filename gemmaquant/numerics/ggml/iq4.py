"""IQ4_NL and IQ4_XS: 4-bit codes into a non-linear table of 16 levels (`kvalues_iq4nl`).

Quantizers are byte-identical to `ggml_quantize_chunk` (`quantize_row_iq4_nl_impl` with 7 tries
either way; the imatrix only changes the weights) and take the blocks of a row chunk, `x [nb,
block]` float32, with the importance weights tiled to the same shape (`qw`, or None). Per
32-weight sub-block, a float scale is searched over 16 candidates (the first from the sub-block's
largest |x|, then `(k - 127)/max` for k = -7..7) keeping the best weighted least-squares fit in
candidate order. IQ4_NL stores that scale as fp16; IQ4_XS quantizes the 8 scales of a 256 block
to 6-bit integers of one fp16 super-scale. The final codes are the levels nearest to x divided by
the *float32* scale (not the rounded fp16 one), as ggml does.

The level table comes from the installed `gguf` package (`gguf.quants.IQ4_NL.kvalues`).
Dequantizers `(b [nb, bytes] uint8, out [nb, block] float32)` write gguf-py's `d*kv` and
`(d*(ls-32))*kv`.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from gemmaquant.numerics.ggml.fields import f16, fp16_bytes
from gemmaquant.numerics.ggml.search import GROUP_MAX_EPS, div, first_abs_max, nearest_int, seq_sum, sqrt
from gemmaquant.numerics.ggml.family import GGMLKernels, per_block
from gemmaquant.numerics.ggml.types import BLOCK, QK_K, GGMLType

NTRY = 7  # llama.cpp's quantize_iq4_nl / quantize_iq4_xs (the unused *_ref of IQ4_NL passes -1)


@lru_cache(maxsize=4)
def _kvalues(device: str) -> torch.Tensor:
    from gguf.quants import IQ4_NL  # noqa: PLC0415 - gguf costs ~0.2 s to import; only IQ4 needs it here

    return torch.tensor(IQ4_NL.kvalues, dtype=torch.float32, device=device)


def kvalues(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 IQ4 levels as float32 (ascending, -127..113)."""
    return _kvalues(str(device))


def best_index(v: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """best_index_int8: the index of the level nearest to v (int64), ties to the upper level.

    For kv[0] < v < kv[15], mu is the first level above v and the choice is `v - kv[mu-1] <
    kv[mu] - v ? mu-1 : mu` in float32, exactly as ggml's binary search ends."""
    mu = torch.bucketize(v, kv, right=True).clamp_(1, kv.numel() - 1)
    idx = torch.where((v - kv[mu - 1]) < (kv[mu] - v), mu - 1, mu)
    idx = torch.where(v <= kv[0], 0, idx)
    return torch.where(v >= kv[-1], kv.numel() - 1, idx)


def _sums(xs: torch.Tensor, w: torch.Tensor, iscale: torch.Tensor, kv: torch.Tensor, terms: torch.Tensor):
    """sumqx = Σ (w*q)*x and sumq2 = Σ (w*q)*q with q the level nearest to iscale*x; [M] each."""
    q = kv[best_index(xs * iscale, kv)]
    wq = w * q
    torch.mul(wq, xs, out=terms[0])
    torch.mul(wq, q, out=terms[1])
    return seq_sum(terms)


def search_scales(xs: torch.Tensor, w: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """The float scale of each 32-weight sub-block: xs, w [32, M] -> [M] (+0.0 for a sub-block
    whose largest |x| is below GROUP_MAX_EPS)."""
    amax, mx = first_abs_max(xs)
    terms = xs.new_empty((2,) + tuple(xs.shape))
    d = div(-mx, float(kv[0]))  # -max/values[0]
    sumqx, sumq2 = _sums(xs, w, div(1.0, d), kv, terms)
    d = torch.where(sumq2 > 0, div(sumqx, sumq2), 0.0)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = _sums(xs, w, div(float(itry + int(kv[0])), mx), kv, terms)
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(take, div(sumqx, sumq2), d)
        best = torch.where(take, d * sumqx, best)
    return torch.where(amax < GROUP_MAX_EPS, 0.0, d)


def _weights(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """[nb, sbs] -> [32, nb*sbs/32] importance: qw*sqrt(sigma2 + x²) with sigma2 = 2Σx²/sbs over the
    (super-)block, or x² without an imatrix."""
    xs = _columns(x)
    if qw is None:
        return xs * xs
    sbs = x.shape[1]
    xt = x.T.contiguous()
    sigma2 = seq_sum(xt * xt) * float(2.0 / sbs)  # sigma2 *= 2.f/super_block_size (exact: a power of 2)
    return _columns(qw) * sqrt(sigma2.repeat_interleave(sbs // 32) + xs * xs)


def _columns(x: torch.Tensor) -> torch.Tensor:
    """[nb, sbs] -> [32, nb*sbs/32]: one column per 32-weight sub-block."""
    return x.reshape(-1, 32).T.contiguous()


def _pack_codes(L: torch.Tensor) -> torch.Tensor:
    """[nb, n] codes -> [nb, n/2] bytes: byte 16i + j = L[32i + j] | L[32i + 16 + j] << 4."""
    q = L.to(torch.uint8).view(L.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(L.shape[0], -1)


def quantize_iq4_nl(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """IQ4_NL: blocks of 32, x = d*kv[q]; [nb, 32] -> [nb, 18]."""
    kv = kvalues(x.device)
    scale = search_scales(_columns(x), _weights(x, qw), kv)  # [nb]
    iscale = torch.where(scale != 0, div(1.0, scale), 0.0)
    L = best_index(x * iscale[:, None], kv)
    return torch.cat([fp16_bytes(scale), _pack_codes(L)], dim=1)


def quantize_iq4_xs(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """IQ4_XS: blocks of 256 in 8 sub-blocks, x = (d*(ls-32))*kv[q]; [nb, 256] -> [nb, 136]."""
    nb = x.shape[0]
    kv = kvalues(x.device)
    scales = search_scales(_columns(x), _weights(x, qw), kv).view(nb, 8).T  # [8, nb]
    _, max_scale = first_abs_max(scales)
    d = div(-max_scale, 32.0)
    iscale = torch.where(d != 0, div(1.0, d), 0.0)
    l = nearest_int(iscale * scales).clamp_(-32, 31)  # [8, nb]
    dl = d * l.float()
    idl = torch.where(dl != 0, div(1.0, dl), 0.0)
    L = best_index(x.view(nb, 8, 32) * idl.T[:, :, None], kv).view(nb, 256)
    ls = l + 32
    low = (ls[0::2] & 15) | ((ls[1::2] & 15) << 4)  # [4, nb]
    high = torch.zeros_like(ls[0])
    for ib in range(8):
        high |= (ls[ib] >> 4) << (2 * ib)
    scales_h = torch.stack([high & 0xFF, high >> 8], dim=1).to(torch.uint8)  # u16, little-endian
    return torch.cat([fp16_bytes(d), scales_h, low.T.to(torch.uint8), _pack_codes(L)], dim=1)


def _nibble_codes(qs: torch.Tensor) -> torch.Tensor:
    """[nb, k*16] bytes -> [nb, k, 32] codes: per 16 bytes, their low nibbles then high nibbles."""
    q = qs.reshape(qs.shape[0], -1, 16)
    return torch.cat([q & 15, q >> 4], dim=2).long()


def dequantize_iq4_nl(b: torch.Tensor, out: torch.Tensor) -> None:
    kv = kvalues(b.device)
    d = f16(b, 0)  # [nb, 1]
    torch.mul(d, kv[_nibble_codes(b[:, 2:]).view(-1, 32)], out=out)


def dequantize_iq4_xs(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    kv = kvalues(b.device)
    d = f16(b, 0)  # [nb, 1]
    high = b[:, 2:4].contiguous().view(torch.int16).int() & 0xFFFF  # [nb, 1]
    low = b[:, 4:8]
    ls = torch.stack([low & 15, low >> 4], dim=2).reshape(nb, 8).int()
    ls |= torch.cat([(high >> (2 * ib)) & 3 for ib in range(8)], dim=1) << 4
    dl = d * (ls - 32).float()  # gguf: d * (ls - 32)
    torch.mul(dl[:, :, None], kv[_nibble_codes(b[:, 8:])], out=out.view(nb, 8, 32))


TYPES = {
    GGMLType.IQ4_NL: GGMLKernels(per_block(quantize_iq4_nl, BLOCK[GGMLType.IQ4_NL][0]), dequantize_iq4_nl),
    GGMLType.IQ4_XS: GGMLKernels(per_block(quantize_iq4_xs, QK_K), dequantize_iq4_xs),
}
