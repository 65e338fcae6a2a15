"""The code fields of GGML blocks, apart from their scale fields: read the codes and the per-sub-block
grid a block's scale bytes define, and write new codes into a block without touching its scales.

Error-feedback rounding (`ggml_gptq.py`) keeps llama.cpp's scale bytes and changes only the codes, so it
needs, per type: where the codes live and how they are packed (`unpack_codes` / `pack_codes`, exact
inverses on every valid block), and the grid of values the scales allow (`sub_grid`): in sub-block s of
a row, code q decodes to `A[s] * level(q) + B[s]`, the float32 association of gguf's dequantizers, so
`values()` is bit-equal to `ggml.dequantize.dequantize` on the same bytes (tests check both).

Codes are int64 `[rows, n]` in the range each format stores: unsigned 0..2^bits-1, except Q8_0 (its
signed int8 values). `level(q)` is `q - ZERO` (Q3_K 4, Q6_K 32, Q4_0 8, Q5_0 16, else 0), or `kv[q]` for
IQ4_NL/IQ4_XS (the non-linear table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GemmaQuantError
from ..numerics.ggml.iq4 import kvalues
from ..numerics.ggml.kquants_low import pack_2bit, unpack_2bit
from ..numerics.ggml.types import BLOCK, GGMLType

T = GGMLType

# Types whose every code can change independently of the scale bytes (gguf-presets.md §5.1).
SCALAR_TYPES = (T.Q4_0, T.Q5_0, T.Q4_1, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
                T.IQ4_NL, T.IQ4_XS)
# weights per sub-block (one scale each), code range [lo, hi], level offset
SUB = {T.Q4_0: 32, T.Q5_0: 32, T.Q4_1: 32, T.Q5_1: 32, T.Q8_0: 32, T.Q2_K: 16, T.Q3_K: 16, T.Q4_K: 32,
       T.Q5_K: 32, T.Q6_K: 16, T.IQ4_NL: 32, T.IQ4_XS: 32}
RANGE = {T.Q4_0: (0, 15), T.Q5_0: (0, 31), T.Q4_1: (0, 15), T.Q5_1: (0, 31), T.Q8_0: (-128, 127),
         T.Q2_K: (0, 3), T.Q3_K: (0, 7), T.Q4_K: (0, 15), T.Q5_K: (0, 31), T.Q6_K: (0, 63),
         T.IQ4_NL: (0, 15), T.IQ4_XS: (0, 15)}
ZERO = {T.Q4_0: 8, T.Q5_0: 16, T.Q3_K: 4, T.Q6_K: 32}
# blocks packed at a time: the int64 temporaries of packing stay near 100 MB (31B's down_proj at Q4_K has
# 451,584 blocks, and its codes as int64 take 0.9 GB)
PACK_BLOCKS = 1 << 16
VALUE_ROWS = 1 << 22  # weights per row slice of `SubGrid.values`


@dataclass
class SubGrid:
    """The values a row's scale bytes allow: code q in sub-block s decodes to A[:, s]*level(q) + B[:, s]."""

    qtype: GGMLType
    A: torch.Tensor  # [rows, n / SUB] float32
    B: torch.Tensor | None  # same, or None (no offset)

    def level(self, q: torch.Tensor) -> torch.Tensor:
        if self.qtype in (T.IQ4_NL, T.IQ4_XS):
            return kvalues(q.device)[q.long()]  # codes may come as int16 (`ggml_gptq.gptq_codes`)
        return (q - ZERO.get(self.qtype, 0)).float()

    def value(self, q: torch.Tensor, s: int | slice) -> torch.Tensor:
        """Decoded values of codes q [rows] (or [rows, k]) in sub-block(s) s."""
        a = self.A[:, s]
        v = a * self.level(q) if q.dim() == a.dim() else a[:, None] * self.level(q)
        if self.B is None:
            return v
        b = self.B[:, s]
        return v + (b if q.dim() == b.dim() else b[:, None])

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """[rows, n] codes -> [rows, n] values float32, a slice of `VALUE_ROWS` weights' rows at a time (whole,
        the levels and products of 31B's down_proj were three float32 copies of it, 1.4 GB)."""
        rows, n = codes.shape
        sub = SUB[self.qtype]
        out = torch.empty(rows, n)
        step = max(1, VALUE_ROWS // n)
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            v = self.A[r0:r1, :, None] * self.level(codes[r0:r1]).view(r1 - r0, n // sub, sub)
            if self.B is not None:
                v = v + self.B[r0:r1, :, None]
            out[r0:r1] = v.view(r1 - r0, n)
        return out


def _blocks(data: torch.Tensor, qtype: GGMLType) -> torch.Tensor:
    if qtype not in SCALAR_TYPES:
        raise GemmaQuantError(f"{qtype.name} has no independent codes (allowed: "
                              f"{', '.join(t.name for t in SCALAR_TYPES)})")
    return data.reshape(-1, BLOCK[qtype][1])


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[:, at:at + 2].contiguous().view(torch.float16).float()[:, 0]  # [nb]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 16k] bytes -> [nb, 32k] codes: per 16 bytes, 16 low nibbles then 16 high nibbles."""
    q = qs.long().view(qs.shape[0], -1, 1, 16)
    return torch.cat([q & 15, q >> 4], dim=2).view(qs.shape[0], -1)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.view(q.shape[0], -1, 2, 16)
    return ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).view(q.shape[0], -1).to(torch.uint8)


_BIT8 = 1 << torch.arange(8)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """[nb, k] bytes -> [nb, 8k] bits, little-endian within each byte."""
    return ((b.long()[:, :, None] >> torch.arange(8)) & 1).view(b.shape[0], -1)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    return (bits.view(bits.shape[0], -1, 8) * _BIT8).sum(2).to(torch.uint8)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for the 8 sub-blocks: [nb, 12] bytes -> (sc, m) [nb, 8] int64."""
    s = s.long()
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's 16 6-bit scales minus 32: [nb, 12] -> [nb, 16] int64."""
    s = s.long()
    low = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], dim=1)
    top = s[:, 8:12]
    high = torch.stack([top, top >> 2, top >> 4, top >> 6], dim=1).reshape(-1, 16) & 3
    return (low | (high << 4)) - 32


def _xs_scales(b: torch.Tensor) -> torch.Tensor:
    """IQ4_XS's 8 6-bit sub-scales minus 32: [nb, 136] -> [nb, 8] int64."""
    high = b[:, 2].long() | (b[:, 3].long() << 8)
    low = b[:, 4:8].long()
    ls = torch.stack([low & 15, low >> 4], dim=2).view(-1, 8)
    return ls | (((high[:, None] >> (2 * torch.arange(8))) & 3) << 4)


def sub_grid(data: torch.Tensor, qtype: GGMLType, rows: int) -> SubGrid:
    """The grid of each sub-block from the scale bytes of `data` ([rows, row_bytes] uint8)."""
    b = _blocks(data, qtype)
    B = None
    if qtype in (T.Q4_0, T.Q5_0, T.Q8_0, T.IQ4_NL):
        A = _f16(b, 0)[:, None]
    elif qtype in (T.Q4_1, T.Q5_1):
        A, B = _f16(b, 0)[:, None], _f16(b, 2)[:, None]
    elif qtype == T.Q2_K:
        sc = b[:, :16].long()
        A = _f16(b, 80)[:, None] * (sc & 15).float()
        B = -(_f16(b, 82)[:, None] * (sc >> 4).float())
    elif qtype == T.Q3_K:
        A = _f16(b, 108)[:, None] * _q3_scales(b[:, 96:108]).float()
    elif qtype in (T.Q4_K, T.Q5_K):
        sc, m = _k_scale_min(b[:, 4:16])
        A = _f16(b, 0)[:, None] * sc.float()
        B = -(_f16(b, 2)[:, None] * m.float())
    elif qtype == T.Q6_K:
        A = _f16(b, 208)[:, None] * b[:, 192:208].view(torch.int8).float()
    else:  # IQ4_XS
        A = _f16(b, 0)[:, None] * (_xs_scales(b) - 32).float()
    return SubGrid(qtype, A.reshape(rows, -1), None if B is None else B.reshape(rows, -1))


def unpack_codes(data: torch.Tensor, qtype: GGMLType, rows: int) -> torch.Tensor:
    """[rows, row_bytes] uint8 -> codes [rows, n] int64."""
    b = _blocks(data, qtype)
    nb = b.shape[0]
    if qtype in (T.Q4_0, T.IQ4_NL):
        q = _nibbles(b[:, 2:18])
    elif qtype == T.Q4_1:
        q = _nibbles(b[:, 4:20])
    elif qtype in (T.Q5_0, T.Q5_1):
        at = 2 if qtype == T.Q5_0 else 4
        q = _nibbles(b[:, at + 4:at + 20]) | (_bits(b[:, at:at + 4]) << 4)
    elif qtype == T.Q8_0:
        q = b[:, 2:34].contiguous().view(torch.int8).long()
    elif qtype == T.Q2_K:
        q = unpack_2bit(b[:, 16:80]).long()
    elif qtype == T.Q3_K:
        high = _bits(b[:, 0:32]).view(nb, 32, 8).transpose(1, 2).reshape(nb, 256)  # bit k of byte l: weight 32k+l
        q = unpack_2bit(b[:, 32:96]).long() | (high << 2)
    elif qtype in (T.Q4_K, T.Q5_K):
        at = 16 if qtype == T.Q4_K else 48
        qs = b[:, at:at + 128].long().view(nb, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=2).view(nb, 256)  # chunk c: L[64c + l], L[64c + 32 + l]
        if qtype == T.Q5_K:
            h = _bits(b[:, 16:48]).view(nb, 32, 8).transpose(1, 2).reshape(nb, 4, 2, 32)  # bit 2c+k of qh[l]
            q = q | (h.reshape(nb, 256) << 4)
    elif qtype == T.Q6_K:
        ql = b[:, 0:128].long().view(nb, 2, 2, 32)  # [half, (q1q3 | q2q4), l]
        qh = b[:, 128:192].long().view(nb, 2, 1, 32)
        low = torch.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
        high = (qh >> torch.tensor([0, 2, 4, 6])[None, None, :, None]) & 3
        q = (low | (high << 4)).view(nb, 256)
    else:  # IQ4_XS
        q = _nibbles(b[:, 8:136])
    return q.reshape(rows, -1)


def pack_codes(data: torch.Tensor, qtype: GGMLType, codes: torch.Tensor) -> torch.Tensor:
    """A copy of `data` ([rows, row_bytes] uint8) with its code fields holding `codes` [rows, n]
    (each in the type's RANGE); the scale fields are copied unchanged."""
    lo, hi = RANGE[qtype]
    if int(codes.min()) < lo or int(codes.max()) > hi:
        raise ValueError(f"{qtype.name} codes out of range {lo}..{hi}")
    rows = data.shape[0]
    out = data.clone()
    b = _blocks(out, qtype)
    q = codes.reshape(b.shape[0], BLOCK[qtype][0])
    for s in range(0, b.shape[0], PACK_BLOCKS):  # views of `out`: packed in place
        _pack_blocks(b[s:s + PACK_BLOCKS], qtype, q[s:s + PACK_BLOCKS].long())
    return out.view(rows, -1)


def _pack_blocks(b: torch.Tensor, qtype: GGMLType, q: torch.Tensor) -> None:
    """Blocks b [nb, bytes] (written in place) get the codes q [nb, block] int64."""
    nb = b.shape[0]
    if qtype in (T.Q4_0, T.IQ4_NL):
        b[:, 2:18] = _pack_nibbles(q)
    elif qtype == T.Q4_1:
        b[:, 4:20] = _pack_nibbles(q)
    elif qtype in (T.Q5_0, T.Q5_1):
        at = 2 if qtype == T.Q5_0 else 4
        b[:, at:at + 4] = _pack_bits((q >> 4) & 1)
        b[:, at + 4:at + 20] = _pack_nibbles(q)
    elif qtype == T.Q8_0:
        b[:, 2:34] = q.to(torch.int8).view(torch.uint8)
    elif qtype == T.Q2_K:
        b[:, 16:80] = pack_2bit(q)
    elif qtype == T.Q3_K:
        b[:, 0:32] = _pack_bits(((q >> 2) & 1).view(nb, 8, 32).transpose(1, 2).reshape(nb, 256))
        b[:, 32:96] = pack_2bit(q)
    elif qtype in (T.Q4_K, T.Q5_K):
        at = 16 if qtype == T.Q4_K else 48
        c = q.view(nb, 4, 2, 32)
        b[:, at:at + 128] = ((c[:, :, 0] & 15) | ((c[:, :, 1] & 15) << 4)).view(nb, 128).to(torch.uint8)
        if qtype == T.Q5_K:
            h = ((q >> 4) & 1).view(nb, 8, 32).transpose(1, 2).reshape(nb, 256)
            b[:, 16:48] = _pack_bits(h)
    elif qtype == T.Q6_K:
        c = q.view(nb, 2, 4, 32)
        q1, q2, q3, q4 = c.unbind(2)
        ql = torch.stack([(q1 & 15) | ((q3 & 15) << 4), (q2 & 15) | ((q4 & 15) << 4)], dim=2)
        qh = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
        b[:, 0:128] = ql.reshape(nb, 128).to(torch.uint8)
        b[:, 128:192] = qh.reshape(nb, 64).to(torch.uint8)
    else:  # IQ4_XS
        b[:, 8:136] = _pack_nibbles(q)
