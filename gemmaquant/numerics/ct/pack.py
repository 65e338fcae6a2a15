"""Bit packing of signed INT4/INT8 codes into int32 words, compressed-tensors' `pack-quantized` layout.

    codes (signed, b bits)   q in [-2^(b-1), 2^(b-1) - 1]        e.g. -8..7 for b = 4
    stored (unsigned)        u = q + 2^(b-1)                     0..15
    word w of a row holds    elements w*per .. w*per + per - 1   per = 32 / b
    element j of the word    bits [b*j, b*j + b)                 element 0 in the lowest bits

    b = 4, row [1, 2, 3, 7, -8, 0, 0, 0]  ->  u = [9, A, B, F, 0, 8, 8, 8]  ->  word 0x8880FBA9
           bit 31 ..........................................  bit 0
                 | 8 | 8 | 8 | 0 | F | B | A | 9 |
    The uint32 word is then reinterpreted as int32 (0x8880FBA9 is stored as -2004812887).

Weights pack along dim 1 (the input dim): [N, K] -> [N, ceil(K / per)]. Zero points [N, G] pack
along dim 0 (the output dim): [N, G] -> [ceil(N / per), G]. The unused bits of a partial last word
are 0, as compressed-tensors' packer leaves them (it pads the *stored* values with 0); unpacking drops them.
Only b in {4, 8} is supported: every code then lies inside one word.
"""

from __future__ import annotations

import sys

import torch

SUPPORTED_BITS = (4, 8)


def _check_bits(num_bits: int) -> int:
    if num_bits not in SUPPORTED_BITS:
        raise ValueError(f"num_bits {num_bits} is not supported (allowed: {SUPPORTED_BITS})")
    return 32 // num_bits


def _pack_rows(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """[R, C] signed codes -> [R, ceil(C / per)] int32, packing along dim 1."""
    per = _check_bits(num_bits)
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"pack_to_int32 needs integer codes, got {q.dtype}")
    lo, hi = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
    if q.numel():
        qlo, qhi = (int(v) for v in torch.aminmax(q))
        if qlo < lo or qhi > hi:
            raise ValueError(f"codes out of the {num_bits}-bit range [{lo}, {hi}]: min {qlo}, max {qhi}")
    rows, cols = q.shape
    words = -(-cols // per)
    u = q.to(torch.int64) + (1 << (num_bits - 1))  # 0 .. 2^b - 1
    if words * per != cols:  # unused high bits of the last word stay 0
        u = torch.nn.functional.pad(u, (0, words * per - cols))
    shifts = torch.arange(per, dtype=torch.int64, device=q.device) * num_bits  # [per]
    acc = (u.view(rows, words, per) << shifts).sum(dim=-1)  # disjoint bits: sum == bitwise or
    acc = torch.where(acc >= 1 << 31, acc - (1 << 32), acc)  # uint32 bits -> int32 value
    return acc.to(torch.int32)


def _unpack_rows(packed: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    """[R, W] int32 -> [R, cols] int8 signed codes."""
    per = _check_bits(num_bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {packed.dtype}")
    rows, words = packed.shape
    if words != -(-cols // per):
        raise ValueError(f"{words} words per row cannot hold {cols} {num_bits}-bit codes "
                         f"(need {-(-cols // per)})")
    if sys.byteorder == "little" and 8 % num_bits == 0:
        # Code j of a word sits at bits [j*b, (j+1)*b): on a little-endian host that is byte j*b//8 of
        # the word, so work on the bytes (1 byte per value of traffic, not int64's 8; RESULTS.md §8).
        b = packed.contiguous().view(torch.uint8)  # [R, 4W]
        per_byte = 8 // num_bits
        if per_byte == 1:
            vals = b
        else:
            shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * num_bits
            vals = ((b.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)).reshape(rows, words * per)
        # uint8 arithmetic wraps: (v - offset) mod 256 read as int8 is exactly v - offset
        return (vals[:, :cols] - (1 << (num_bits - 1))).view(torch.int8)
    u = packed.to(torch.int64) & 0xFFFFFFFF  # back to the uint32 bits
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * num_bits
    vals = (u.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)  # [R, W, per]
    return (vals.reshape(rows, words * per)[:, :cols] - (1 << (num_bits - 1))).to(torch.int8)


def pack_to_int32(q: torch.Tensor, num_bits: int, packed_dim: int = 1) -> torch.Tensor:
    """Pack signed codes [N, K] into int32: along dim 1 -> [N, ceil(K*b/32)] (weights), or along
    dim 0 -> [ceil(N*b/32), K] (zero points)."""
    if q.ndim != 2:
        raise ValueError(f"pack_to_int32 expects a 2-D tensor, got shape {list(q.shape)}")
    if packed_dim == 1:
        return _pack_rows(q, num_bits)
    if packed_dim == 0:
        return _pack_rows(q.t(), num_bits).t().contiguous()
    raise ValueError(f"packed_dim must be 0 or 1, got {packed_dim}")


def unpack_from_int32(packed: torch.Tensor, num_bits: int, shape, packed_dim: int = 1) -> torch.Tensor:
    """Inverse of pack_to_int32: int32 words -> int8 signed codes of the original `shape` [N, K]."""
    n, k = (int(s) for s in shape)
    if packed.ndim != 2:
        raise ValueError(f"unpack_from_int32 expects a 2-D tensor, got shape {list(packed.shape)}")
    if packed_dim == 1:
        if packed.shape[0] != n:
            raise ValueError(f"packed rows {packed.shape[0]} != {n}")
        return _unpack_rows(packed, num_bits, k)
    if packed_dim == 0:
        if packed.shape[1] != k:
            raise ValueError(f"packed columns {packed.shape[1]} != {k}")
        return _unpack_rows(packed.t(), num_bits, n).t().contiguous()
    raise ValueError(f"packed_dim must be 0 or 1, got {packed_dim}")
