"""GGML quantization in vectorized torch, byte-identical with llama.cpp's `ggml_quantize_chunk`.

`quantize(w [rows, n_per_row] float32, qtype, imatrix [n_per_row] | None) -> uint8 [rows, row_bytes]`.
Without an imatrix ggml runs the `*_ref` routines, with one the `*_impl` routines; Q8_0 (and the
float types) ignore it. Work is vectorized over all blocks of a row chunk; rows are processed in
chunks so that float32 temporaries stay around 64 MB whatever the tensor size (the IQ neighbour
searches slice their work further, see `iqgrid.py`). This module holds Q8_0 and the legacy
32-weight types; Q4_K..Q6_K are in `kquants.py`, every other type in its family module (`FAMILY`:
Q2_K/Q3_K, IQ4_*, IQ3_*, IQ2_*, IQ1_*, TQ*), the shared searches in `search.py`. IQ2_XXS, IQ2_XS
and IQ1_S need an imatrix, as in llama.cpp.
"""

from __future__ import annotations

import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.numerics.ggml.iq1 import quantize_iq1_m, quantize_iq1_s
from gemmaquant.numerics.ggml.iq2 import quantize_iq2_s, quantize_iq2_xs, quantize_iq2_xxs
from gemmaquant.numerics.ggml.iq3 import quantize_iq3_s, quantize_iq3_xxs
from gemmaquant.numerics.ggml.iq4 import quantize_iq4_nl, quantize_iq4_xs
from gemmaquant.numerics.ggml.fields import fp16_bytes
from gemmaquant.numerics.ggml.kquants import quantize_q6_k, quantize_q45_k
from gemmaquant.numerics.ggml.kquants_low import quantize_q2_k, quantize_q3_k
from gemmaquant.numerics.ggml.search import (
    div, first_abs_max, make_qkx, make_qx_quants, roundf, running_min_max, seq_sum, sqrt,
)
from gemmaquant.numerics.ggml.ternary import quantize_tq1_0, quantize_tq2_0
from gemmaquant.numerics.ggml.types import BLOCK, REQUIRES_IMATRIX, GGMLType, ggml_type, row_bytes

# Values per chunk: 1 MB per float32 temporary; the K-quant searches keep ~15 of them alive.
# Measured fastest on CPU (256K beat 64K and 1M for Q8_0 and Q6_K).
CHUNK_VALUES = 1 << 18

# The types whose quantizer lives in a family module: (blocks [nb, block], qw | None) -> [nb, bytes].
FAMILY = {
    GGMLType.Q2_K: quantize_q2_k,
    GGMLType.Q3_K: quantize_q3_k,
    GGMLType.IQ4_NL: quantize_iq4_nl,
    GGMLType.IQ4_XS: quantize_iq4_xs,
    GGMLType.IQ1_S: quantize_iq1_s,
    GGMLType.IQ1_M: quantize_iq1_m,
    GGMLType.IQ2_XXS: quantize_iq2_xxs,
    GGMLType.IQ2_XS: quantize_iq2_xs,
    GGMLType.IQ2_S: quantize_iq2_s,
    GGMLType.IQ3_XXS: quantize_iq3_xxs,
    GGMLType.IQ3_S: quantize_iq3_s,
    GGMLType.TQ1_0: quantize_tq1_0,
    GGMLType.TQ2_0: quantize_tq2_0,
}


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[nb, 32] codes -> [nb, 16] bytes: byte j = (q_j & 15) | (q_{j+16} & 15) << 4."""
    q = q.to(torch.uint8)
    return (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)


def _pack_qh(q: torch.Tensor) -> torch.Tensor:
    """[nb, 32] 5-bit codes -> [nb, 4] bytes of the little-endian u32 whose bit j is bit 4 of q_j."""
    bits = ((q >> 4) & 1).to(torch.uint8).view(-1, 4, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=q.device)
    return (bits * weights).sum(dim=2, dtype=torch.uint8)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
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


def _legacy_impl(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor, qtype: GGMLType) -> torch.Tensor:
    """quantize_row_q{4,5}_{0,1}_impl: w = qw * sqrt(sigma2_row + x^2), then a weighted search."""
    xs = x.T.contiguous()  # [32, nb]
    w = qw.T.contiguous() * sqrt(sigma2 + xs * xs)
    bits = 4 if qtype in (GGMLType.Q4_0, GGMLType.Q4_1) else 5
    if qtype in (GGMLType.Q4_0, GGMLType.Q5_0):
        d, L = make_qx_quants(xs, 1 << (bits - 1), w)
        return _pack_32(fp16_bytes(d), None, L.T, bits)
    d, the_min, L = make_qkx(xs, w, (1 << bits) - 1, -0.9, 0.05, 36, qkx3=True)
    return _pack_32(fp16_bytes(d), fp16_bytes(-the_min), L.T, bits)


def _pack_32(d: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor, bits: int) -> torch.Tensor:
    """d [, m] [, qh] qs, the field order of block_q{4,5}_{0,1}."""
    parts = [d] if m is None else [d, m]
    if bits == 5:
        parts.append(_pack_qh(q))
    parts.append(_pack_nibbles(q))
    return torch.cat(parts, dim=1)


def _bf16(w: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_BF16: round to nearest even on the bits; NaN forced quiet. A bf16 value is copied."""
    u = w.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = torch.where(nan, (u >> 16) | 64, rounded).to(torch.int32).to(torch.int16)
    return bits.view(torch.uint8).view(w.shape[0], -1)


def _quantize_chunk(x: torch.Tensor, qtype: GGMLType, imatrix: torch.Tensor | None) -> torch.Tensor:
    rows, n = x.shape
    block = BLOCK[qtype][0]
    blocks = x.reshape(-1, block)  # [rows * n/block, block]
    qw = None
    if imatrix is not None and qtype != GGMLType.Q8_0:
        qw = imatrix.reshape(1, n).expand(rows, n).reshape(-1, block)
    if qtype in FAMILY:
        out = FAMILY[qtype](blocks, qw)
    elif qtype == GGMLType.Q8_0:
        out = _q8_0(blocks)
    elif qtype == GGMLType.Q6_K:
        out = quantize_q6_k(blocks, qw)
    elif qtype in (GGMLType.Q4_K, GGMLType.Q5_K):
        out = quantize_q45_k(blocks, qw, 15 if qtype == GGMLType.Q4_K else 31)
    elif qw is not None:
        xt = x.T.contiguous()
        sigma2 = div(seq_sum(xt * xt), float(n))  # over the whole row, then per block
        out = _legacy_impl(blocks, qw, sigma2.repeat_interleave(n // block), qtype)
    elif qtype in (GGMLType.Q4_0, GGMLType.Q5_0):
        out = _q4_0_q5_0_ref(blocks, 4 if qtype == GGMLType.Q4_0 else 5)
    else:
        out = _q4_1_q5_1_ref(blocks, 4 if qtype == GGMLType.Q4_1 else 5)
    return out.reshape(rows, -1)


def quantize(w: torch.Tensor, qtype: GGMLType | int | str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize a [rows, n_per_row] tensor to GGML blocks; returns uint8 [rows, row_bytes].

    The source is read as float32 (a bf16/f16 tensor converts exactly, as llama-quantize does).
    `imatrix` is the per-column importance ([n_per_row], ≥ 0) from llama-imatrix.
    """
    qtype = ggml_type(qtype)
    if w.dim() != 2:
        raise GemmaQuantError(f"quantize expects a 2-D [rows, n_per_row] tensor, got shape {tuple(w.shape)}")
    rows, n = w.shape
    nbytes = row_bytes(qtype, n)
    if qtype == GGMLType.BF16 and w.dtype == torch.bfloat16:
        return w.contiguous().view(torch.uint8).view(rows, nbytes)
    w = w.to(torch.float32)
    if qtype == GGMLType.F32:
        return w.contiguous().view(torch.uint8).view(rows, nbytes)
    if qtype == GGMLType.F16:
        return w.to(torch.float16).contiguous().view(torch.uint8).view(rows, nbytes)
    if qtype == GGMLType.BF16:
        return _bf16(w)
    if imatrix is None and qtype in REQUIRES_IMATRIX:
        raise GemmaQuantError(
            f"{qtype.name} needs an importance matrix: llama.cpp cannot quantize it without one "
            f"(compute one with `gemmaquant imatrix`, or pick a type that does not need it)"
        )
    if imatrix is not None:
        imatrix = imatrix.to(device=w.device, dtype=torch.float32).reshape(-1)
        if imatrix.numel() != n:
            raise GemmaQuantError(f"imatrix has {imatrix.numel()} values but the rows have {n} columns")
    out = torch.empty((rows, nbytes), dtype=torch.uint8, device=w.device)
    step = max(1, CHUNK_VALUES // n)
    for r in range(0, rows, step):
        out[r : r + step] = _quantize_chunk(w[r : r + step].contiguous(), qtype, imatrix)
    return out
