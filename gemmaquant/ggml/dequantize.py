"""GGML block dequantizers in plain torch (CPU or CUDA), bit-equal to `gguf.quants.dequantize`.

Each `_<type>(blocks [nb, bytes] uint8) -> [nb, block] float32` evaluates the same float32
expression as gguf-py's numpy code, in the same association, e.g. Q4_K is `(d*sc)*q - dmin*m`
(two roundings per weight, never an FMA). Integer codes become float exactly, first: torch's
mixed int8*float kernels are ~2x slower than a cast followed by in-place float ops. Work runs in
chunks of blocks so intermediates stay in cache and memory stays bounded.
"""

from __future__ import annotations

import math

import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.ggml.types import BLOCK, QK_K, GGMLType, ggml_type

CHUNK_VALUES = 1 << 18  # weights per chunk (1 MB of float32 output)


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The f16 field at byte `offset` of every block, as float32 [nb, 1]."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """[nb, k] bytes -> [nb, k/group, 2, group]: low nibbles of each `group` bytes, then high ones."""
    qs = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2)


def _bits(bytes_: torch.Tensor) -> torch.Tensor:
    """[nb, k] bytes -> [nb, k, 8] bit planes: [..., b] is bit b of each byte."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bytes_.device)
    return (bytes_.unsqueeze(-1) >> shifts) & 1


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 16).view(torch.int8).reshape(b.shape[0], 32) - 8
    return q.float().mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5(b: torch.Tensor, qh_at: int) -> torch.Tensor:
    """5-bit codes 0..31 of Q5_0/Q5_1: low nibbles from qs, bit 4 from the u32 qh (bit j -> q_j)."""
    ql = _nibbles(b[:, qh_at + 4 :], 16).reshape(b.shape[0], 32)
    qh = _bits(b[:, qh_at : qh_at + 4]).reshape(b.shape[0], 32)
    return ql | (qh << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return (_q5(b, 2).view(torch.int8) - 16).float().mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _q5(b, 4).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes -> 6-bit (sc [nb, 8], m [nb, 8]) as uint8 (get_scale_min_k4)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: (d*sc, dmin*m) as float32 [nb, 8, 1]."""
    sc, m = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc).unsqueeze(-1)
    dm = (_f16(b, 2) * m).unsqueeze(-1)
    return d, dm


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dm = _k_scales(b)
    q = _nibbles(b[:, 16:], 32).reshape(b.shape[0], 8, 32)
    return q.float().mul_(d).sub_(dm).reshape(b.shape[0], QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dm = _k_scales(b)
    ql = _nibbles(b[:, 48:], 32).reshape(b.shape[0], 8, 32)
    # qh[l] bit j is bit 4 of weight 32j + l.
    qh = _bits(b[:, 16:48]).transpose(1, 2)  # [nb, 8, 32]
    return (ql | (qh << 4)).float().mul_(d).sub_(dm).reshape(b.shape[0], QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).unsqueeze(-1)  # [nb, 16, 1]
    ql = _nibbles(b[:, :128], 64).reshape(nb, 2, 4, 32)  # [half, (l<32 lo, l>=32 lo, hi, hi), l]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    qh = (b[:, 128:192].reshape(nb, 2, 1, 32) >> shifts) & 3
    q = (ql | (qh << 4)).view(torch.int8) - 32
    return q.reshape(nb, 16, 16).float().mul_(d).reshape(nb, QK_K)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


def _f16_all(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32).clone()


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
}


def dequantize(data: torch.Tensor, qtype: GGMLType | int | str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """GGML bytes (uint8, [rows, row_bytes] or flat) -> float32 tensor of `shape` (torch order,
    the last dimension is the row). Runs on the device of `data`."""
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
    blocks = data.reshape(-1, nbytes)
    out = torch.empty((n // block, block), dtype=torch.float32, device=data.device)
    step = max(1, CHUNK_VALUES // block)
    kernel = _KERNELS[qtype]
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = kernel(blocks[i : i + step]).reshape(-1, block)
    return out.reshape(shape)
