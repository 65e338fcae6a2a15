"""Fields every GGML block type shares, written and read one way: fp16 scales and K-quant 6-bit
scale/min pairs.

Blocks arrive as uint8 [n_blocks, block_bytes] (little-endian, as on disk).
"""

from __future__ import annotations

import torch


def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[n] float32 -> [n, 2] uint8: GGML_FP32_TO_FP16 (IEEE round to nearest even), little-endian."""
    return v.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def f16(b: torch.Tensor, offset: int, count: int = 1) -> torch.Tensor:
    """`count` consecutive fp16 fields from byte `offset` of every block, as float32 [nb, count].

    Through an int16 view of the whole blocks where the layout allows (every block size and field
    offset is even): one strided f16 -> f32 conversion instead of first gathering the 2-byte runs."""
    try:
        return b.view(torch.int16)[:, offset // 2 : offset // 2 + count].view(torch.float16).float()
    except RuntimeError:  # a view of odd storage offset or non-contiguous rows
        return b[:, offset : offset + 2 * count].contiguous().view(torch.float16).float()


def get_scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's get_scale_min_k4 for j = 0..7 at once: the 12 scale bytes of a Q4_K/Q5_K block
    (last dim, any integer dtype wider than uint8) -> (scales [..., 8], mins [..., 8]), 6 bits each.

    Bytes 0-3 hold sc[0:4] in their low 6 bits and the top 2 bits of sc[4:8] above them, bytes 4-7 the
    same for the mins, bytes 8-11 the low 4 bits of sc[4:8] (low nibbles) and of m[4:8] (high)."""
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], dim=-1)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc, m
