"""GGML block dequantizers in plain torch (CPU or CUDA), bit-equal to `gguf.quants.dequantize`.

Each kernel `_<type>(b [nb, bytes] uint8, out [nb, block] float32)` writes the same float32
expression as gguf-py's numpy code, in the same association, e.g. Q4_K is `(d*sc)*q - dmin*m`
(two roundings per weight, never an FMA).

Speed (CPU): the bit unpacking runs SWAR on int64 words (8 codes per element, masks such as
0x0F0F0F0F0F0F0F0F), centring (`q - 8`) runs on int8 bytes, and only then do codes become
float32, with one conversion into `out` and in-place multiplies. Integer codes convert exactly,
so converting first changes no bit; torch's mixed int8*float kernels are ~3x slower than a
cast followed by in-place float ops. Fields are copied into contiguous buffers first because
blocks of 18/22/34/210 bytes do not keep 8-byte words aligned. Interleaving low and high nibbles
is one `stack` of byte runs; torch copies runs of >= 64 bytes with vector code and shorter ones
byte by byte, so Q6_K merges its qh bits before interleaving, into 64-byte runs. Tensor-by-tensor
shifts are ~20x slower than scalar ones, so shifts are scalars. Each chunk is ~10-20 launches.

`compiled=True` (or `ggml.compiled.set_enabled(True)`, GEMMAQUANT_COMPILE=1) runs the types' fused
expressions (`numerics/ggml/fused.py`) through torch.compile on the CPU instead: one vectorized loop per
tensor, same bits, faster than the plain path after a compile per type (benchmarks/RESULTS.md
section 6); any failure falls back to these kernels with a warning.
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.numerics.ggml import compiled as _compiled
from gemmaquant.numerics.ggml.fields import f16, get_scale_min_k4
from gemmaquant.numerics.ggml.iq1 import dequantize_iq1_m, dequantize_iq1_s
from gemmaquant.numerics.ggml.iq2 import dequantize_iq2_s, dequantize_iq2_xs, dequantize_iq2_xxs
from gemmaquant.numerics.ggml.iq3 import dequantize_iq3_s, dequantize_iq3_xxs
from gemmaquant.numerics.ggml.iq4 import dequantize_iq4_nl, dequantize_iq4_xs
from gemmaquant.numerics.ggml.kquants_low import dequantize_q2_k, dequantize_q3_k
from gemmaquant.numerics.ggml.ternary import dequantize_tq1_0, dequantize_tq2_0
from gemmaquant.numerics.ggml.types import BLOCK, GGMLType, ggml_type

# Weights per chunk and thread (2 MB of float32 output each): every torch op pays a fixed dispatch
# cost, so chunks must be large, yet small enough that a chunk's temporaries stay in cache
# (benchmarks/RESULTS.md, dequantization).
CHUNK_VALUES = 1 << 19


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
    4 KiB, which made writing a fresh 32 MiB output ~3x faster here (THP mode `madvise`, the usual
    default; with `never` the advice is ignored). Costs up to 2 MiB of slack per tensor."""
    n = math.prod(shape)
    if torch.device(device).type != "cpu" or n * 4 < 4 * HUGE_PAGE:
        return torch.empty(shape, dtype=torch.float32, device=device)
    raw = torch.empty(n * 4 + HUGE_PAGE, dtype=torch.uint8)
    skip = -raw.data_ptr() % HUGE_PAGE
    _advise_huge(raw.data_ptr() + skip, n * 4 // HUGE_PAGE * HUGE_PAGE)
    return raw[skip : skip + n * 4].view(torch.float32).view(shape)


def _bytes8(byte: int) -> int:
    """A byte repeated in all 8 bytes of an int64 word (byte < 0x80 keeps the word positive)."""
    return int.from_bytes(bytes([byte]) * 8, "little")


LO4 = _bytes8(0x0F)  # low nibble of every byte
BIT4 = _bytes8(0x10)  # bit 4 of every byte
BITS45 = _bytes8(0x30)  # bits 4..5 of every byte


def _words(field: torch.Tensor) -> torch.Tensor:
    """[nb, k] bytes (k a multiple of 8) -> a contiguous [nb, k/8] int64 copy."""
    return field.contiguous().view(torch.int64)


def _nibbles(w: torch.Tensor) -> torch.Tensor:
    """[..., g, k] int64 words -> [..., g, 2, 8k] uint8 codes 0..15: for each group of 8k bytes,
    their low nibbles, then their high nibbles (the order of every ggml 4-bit type).

    The interleave is one `stack` of int64 words (runs of k): copying 8-byte elements costs
    ~0.07 ns/byte against ~0.1 for the same runs as bytes when runs are short (Q4_0's 16)."""
    lo = w & LO4
    hi = (w >> 4).bitwise_and_(LO4)  # (>> is arithmetic; the mask drops the fill)
    return torch.stack([lo, hi], dim=-2).view(torch.uint8)


# Byte v -> the int64 word whose byte j has bit j of v at bit 4 (Q5_0/Q5_1 qh spreading).
_SPREAD = torch.tensor(
    [sum(((v >> j) & 1) << (8 * j + 4) for j in range(8)) for v in range(256)], dtype=torch.int64
)


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b[:, 2:].view(torch.int8))
    out.mul_(f16(b, 0, 1))  # gguf: d * x


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(_words(b[:, 2:]).view(-1, 1, 2)).view(torch.int8).view(out.shape).sub_(8)
    out.copy_(q)
    out.mul_(f16(b, 0, 1))


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    dm = f16(b, 0, 2)
    out.copy_(_nibbles(_words(b[:, 4:]).view(-1, 1, 2)).view(torch.uint8).view(out.shape))
    out.mul_(dm[:, :1]).add_(dm[:, 1:])  # gguf: (d * q) + m


def _q5_codes(b: torch.Tensor, qh_at: int) -> torch.Tensor:
    """5-bit codes 0..31 of Q5_0/Q5_1 as [nb, 32] uint8: low nibbles from qs, bit 4 from qh, the
    little-endian u32 whose bit j is bit 4 of code j (spread by a byte -> word table)."""
    q = _nibbles(_words(b[:, qh_at + 4 :]).view(-1, 1, 2)).view(-1, 32).view(torch.int64)
    q |= _SPREAD.to(b.device)[b[:, qh_at : qh_at + 4].to(torch.int32)]
    return q.view(torch.uint8).view(-1, 32)


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_q5_codes(b, 2).view(torch.int8).sub_(16))
    out.mul_(f16(b, 0, 1))


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    dm = f16(b, 0, 2)
    out.copy_(_q5_codes(b, 4))
    out.mul_(dm[:, :1]).add_(dm[:, 1:])


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: (d*sc, dmin*m) as float32 [nb, 8, 1]."""
    sc, m = get_scale_min_k4(b[:, 4:16].int())
    s = torch.stack([sc, m], dim=1).float()  # [nb, 2, 8]
    s *= f16(b, 0, 2)[:, :, None]  # gguf: d * sc, dmin * m
    return s[:, 0, :, None], s[:, 1, :, None]


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    d, dm = _k_scales(b)
    out.copy_(_nibbles(_words(b[:, 16:]).view(-1, 4, 4)).view(torch.uint8).view(out.shape))
    out.view(-1, 8, 32).mul_(d).sub_(dm)  # gguf: d * q - dm


def _shifted(w: torch.Tensor, shifts: tuple[int, ...], dim: int) -> torch.Tensor:
    """Copies of `w` shifted left by each of `shifts` (negative: right), stacked at `dim`. Scalar
    shifts: torch's tensor-by-tensor shifts are ~20x slower than these."""
    return torch.stack([w << s if s >= 0 else w >> -s for s in shifts], dim=dim)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    d, dm = _k_scales(b)
    w = _words(b[:, 16:])  # [nb, 20]: qh[32] then qs[128]
    qs, qh = w[:, 4:].view(nb, 4, 4), w[:, :4]  # [block, 32-byte chunk c, word], [block, word]
    # qh[l] bit j is bit 4 of weight 32j + l; sub-block 2c takes the low nibbles of chunk c and
    # bit 2c, sub-block 2c+1 the high nibbles and bit 2c+1. Per chunk, bit 2c is moved to bit 4
    # (and so bit 2c+1 to bit 5) before the nibbles are interleaved.
    qhc = _shifted(qh, (4, 2, 0, -2), dim=1)  # [block, c, word]
    lo = (qs & LO4).bitwise_or_(qhc & BIT4)
    hi = (qs >> 4).bitwise_and_(LO4).bitwise_or_((qhc >> 1).bitwise_and_(BIT4))
    q = torch.stack([lo, hi], dim=2).view(torch.uint8)  # [block, c, lo|hi, 32]
    out.copy_(q.view(out.shape))
    out.view(nb, 8, 32).mul_(d).sub_(dm)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """Per 128-weight half h and l < 32, the quarters k = 0..3 (weights 128h + 32k + l) take the low
    nibble of ql[64h + l], of ql[64h + 32 + l], the high nibbles of the same, and bits 2k..2k+1 of
    qh[32h + l] as bits 4..5; the code minus 32 times d*scale[sub-block of 16]."""
    nb = b.shape[0]
    w = _words(b[:, :192])  # [nb, 24]: ql[128] then qh[64]
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


def _f32(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.contiguous().view(torch.float32))


def _f16_all(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.contiguous().view(torch.float16))


def _bf16(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.contiguous().view(torch.bfloat16))


_KERNELS = {
    GGMLType.F32: _f32,
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
    # family modules (quantizer and dequantizer of a type in one place)
    GGMLType.Q2_K: dequantize_q2_k,
    GGMLType.Q3_K: dequantize_q3_k,
    GGMLType.IQ4_NL: dequantize_iq4_nl,
    GGMLType.IQ4_XS: dequantize_iq4_xs,
    GGMLType.IQ1_S: dequantize_iq1_s,
    GGMLType.IQ1_M: dequantize_iq1_m,
    GGMLType.IQ2_XXS: dequantize_iq2_xxs,
    GGMLType.IQ2_XS: dequantize_iq2_xs,
    GGMLType.IQ2_S: dequantize_iq2_s,
    GGMLType.IQ3_XXS: dequantize_iq3_xxs,
    GGMLType.IQ3_S: dequantize_iq3_s,
    GGMLType.TQ1_0: dequantize_tq1_0,
    GGMLType.TQ2_0: dequantize_tq2_0,
}


def dequantize(
    data: torch.Tensor,
    qtype: GGMLType | int | str,
    shape: tuple[int, ...] | torch.Size,
    out: torch.Tensor | None = None,
    compiled: bool | None = None,
) -> torch.Tensor:
    """GGML bytes (uint8, [rows, row_bytes] or flat) -> float32 tensor of `shape` (torch order,
    the last dimension is the row). Runs on the device of `data`.

    `out`, a contiguous float32 tensor of `shape` on that device, is filled and returned instead
    of a new tensor: reusing one saves the page faults of fresh memory (see `empty_f32`).
    `compiled`: use the torch.compile kernels (`numerics/ggml/compiled.py`, CPU only, same bits); None
    follows `compiled.set_enabled` / GEMMAQUANT_COMPILE."""
    qtype = ggml_type(qtype)
    block, nbytes = BLOCK[qtype]
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if data.dtype != torch.uint8:
        raise GemmaQuantError(f"dequantize expects uint8 bytes, got {data.dtype}")
    if not shape or shape[-1] % block != 0:
        raise GemmaQuantError(f"shape {shape}: the row is not a multiple of the {qtype.name} block of {block}")
    if data.numel() != n // block * nbytes:
        raise GemmaQuantError(
            f"{qtype.name} data of {data.numel()} bytes does not match shape {shape} "
            f"({n // block * nbytes} bytes expected)"
        )
    if out is None:
        out = empty_f32(shape, data.device)
    elif (out.dtype, tuple(out.shape), out.device) != (torch.float32, shape, data.device) or not out.is_contiguous():
        raise GemmaQuantError(
            f"dequantize out= must be a contiguous float32 {shape} tensor on {data.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if data.storage_offset() % 8:  # the kernels view whole blocks as int16 (and fields as int64)
        data = data.clone()
    blocks, rows = data.reshape(-1, nbytes), out.view(-1, block)
    kernel = _KERNELS[qtype]
    if (_compiled.enabled() if compiled is None else compiled) and _compiled.run(blocks, qtype, rows, kernel):
        return out
    # One GPU launch set for the whole tensor; on the CPU, chunks of CHUNK_VALUES per thread
    # (each op splits its chunk between the threads).
    step = blocks.shape[0] if data.is_cuda else max(1, CHUNK_VALUES * torch.get_num_threads() // block)
    for i in range(0, blocks.shape[0], step):
        kernel(blocks[i : i + step], rows[i : i + step])
    return out
