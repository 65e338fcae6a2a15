"""What the eager (plain torch) dequantizers share: bit unpacking on int64 words, and their output.

Speed (CPU): the bit unpacking runs SWAR on int64 words (8 codes per element, masks such as
0x0F0F0F0F0F0F0F0F), centring (`q - 8`) runs on int8 bytes, and only then do codes become
float32, with one conversion into `out` and in-place multiplies. Integer codes convert exactly,
so converting first changes no bit; torch's mixed int8*float kernels are slower than a cast
followed by in-place float ops. Fields are copied into contiguous buffers first because blocks of
18/22/34/210 bytes do not keep 8-byte words aligned. Interleaving low and high nibbles is one
`stack` of byte runs; torch copies runs of >= 64 bytes with vector code and shorter ones byte by
byte, so Q6_K merges its qh bits before interleaving, into 64-byte runs. Tensor-by-tensor shifts
are much slower than scalar ones, so shifts are scalars.
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch

HUGE_PAGE = 1 << 21  # x86-64/arm64 transparent huge page
MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
_madvise = None  # libc's madvise once looked up; False where unavailable


def _advise_huge(addr: int, length: int) -> None:
    global _madvise
    if _madvise is None:
        try:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise if sys.platform == "linux" else False
            if _madvise:
                _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _madvise = False
    if _madvise:
        _madvise(addr, length, MADV_HUGEPAGE)  # advice only: a failure changes nothing


def empty_f32(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A fresh contiguous float32 tensor. Large CPU ones start on a 2 MiB boundary in memory
    advised for transparent huge pages: first writes then fault once per 2 MiB instead of once per
    4 KiB, which makes writing a fresh large output much faster (THP mode `madvise`, the usual
    default; with `never` the advice is ignored). Costs up to 2 MiB of slack per tensor."""
    n = math.prod(shape)
    if torch.device(device).type != "cpu" or n * 4 < 4 * HUGE_PAGE:
        return torch.empty(shape, dtype=torch.float32, device=device)
    raw = torch.empty(n * 4 + HUGE_PAGE, dtype=torch.uint8)
    skip = -raw.data_ptr() % HUGE_PAGE
    _advise_huge(raw.data_ptr() + skip, n * 4 // HUGE_PAGE * HUGE_PAGE)
    return raw[skip : skip + n * 4].view(torch.float32).view(shape)


def bytes8(byte: int) -> int:
    """A byte repeated in all 8 bytes of an int64 word (byte < 0x80 keeps the word positive)."""
    return int.from_bytes(bytes([byte]) * 8, "little")


LO4 = bytes8(0x0F)  # low nibble of every byte
BIT4 = bytes8(0x10)  # bit 4 of every byte
BITS45 = bytes8(0x30)  # bits 4..5 of every byte


def words(field: torch.Tensor) -> torch.Tensor:
    """[nb, k] bytes (k a multiple of 8) -> a contiguous [nb, k/8] int64 copy."""
    return field.contiguous().view(torch.int64)


def nibbles(w: torch.Tensor) -> torch.Tensor:
    """[..., g, k] int64 words -> [..., g, 2, 8k] uint8 codes 0..15: for each group of 8k bytes,
    their low nibbles, then their high nibbles (the order of every ggml 4-bit type).

    The interleave is one `stack` of int64 words (runs of k): copying 8-byte elements is cheaper
    than copying the same runs as bytes when runs are short (Q4_0's 16)."""
    lo = w & LO4
    hi = (w >> 4).bitwise_and_(LO4)  # (>> is arithmetic; the mask drops the fill)
    return torch.stack([lo, hi], dim=-2).view(torch.uint8)


def shifted(w: torch.Tensor, shifts: tuple[int, ...], dim: int) -> torch.Tensor:
    """Copies of `w` shifted left by each of `shifts` (negative: right), stacked at `dim`. Scalar
    shifts: torch's tensor-by-tensor shifts are much slower than these."""
    return torch.stack([w << s if s >= 0 else w >> -s for s in shifts], dim=dim)
