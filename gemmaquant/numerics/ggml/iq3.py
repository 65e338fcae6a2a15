"""IQ3_XXS and IQ3_S: 4 weights per grid point of 8 odd levels, with a 4-bit scale per 32 weights.

Quantizers are byte-identical to `ggml_quantize_chunk` (`quantize_row_iq3_xxs_impl` /
`quantize_row_iq3_s_impl`, with or without an imatrix) and take the blocks of a row chunk,
`x [nb, 256]` float32, and the importance weights tiled to the same shape (`qw`, or None). The
search itself is `iqgrid.grid_search`. IQ3_XXS has a 256-point grid and 7 stored sign bits per
8 weights (the 8th by parity); IQ3_S a 512-point grid and all 8 sign bits.

IQ3_S reproduces a quirk of ggml's writer: an exactly-zero 32-weight sub-block does not advance
its `qs`/`signs` write pointers, so the next sub-blocks' grid indices and signs land one slot
early and the last slots stay 0 (llama.cpp itself then decodes such a block wrongly).

Dequantizers `(b [nb, bytes] uint8, out [nb, 256] float32)` write gguf-py's expressions: IQ3_XXS
`((d*(0.5+l))*0.5)*grid*sign`, IQ3_S `(d*(1+2l))*grid*sign`, grids from the gguf package.
"""

from __future__ import annotations

import torch

from gemmaquant.numerics.ggml.iqgrid import GridSpec, grid_search, sub_scales
from gemmaquant.numerics.ggml.iqgrid_tables import grid_tables, ksigns
from gemmaquant.numerics.ggml.fields import f16, fp16_bytes
from gemmaquant.numerics.ggml.search import div, seq_sum, sqrt
from gemmaquant.numerics.ggml.family import GGMLKernels, per_block
from gemmaquant.numerics.ggml.types import QK_K, GGMLType

IQ3_XXS = GridSpec(grid="IQ3_XXS", sub=32, steps=(15, 0.2), parity=True, on_grid_init=True,
                   requant_all=False, eps=1e-8)  # fmt: skip
IQ3_S = GridSpec(grid="IQ3_S", sub=32, steps=(9, 0.2), parity=False, on_grid_init=False,
                 requant_all=True, eps=None)  # fmt: skip


def _weights(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """qw*sqrt(sigma2 + x²) with sigma2 = 2Σx²/256 per block, or x² without an imatrix."""
    if qw is None:
        return x * x
    xt = x.T.contiguous()
    sigma2 = div(2.0 * seq_sum(xt * xt), 256.0)
    return qw * sqrt(sigma2[:, None] + x * x)


def quantize_iq3_xxs(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """[nb, 256] -> [nb, 98]: d, qs[64] (one grid index per 4 weights), then per 32 weights a u32
    of 4 x 7 sign bits and the 4-bit scale in bits 28..31."""
    nb = x.shape[0]
    r = grid_search(x, _weights(x, qw), IQ3_XXS)
    d16, l, live = sub_scales(r.scale, nb, 1.0125)
    qs = r.index.T.reshape(nb, 64)  # [block, sub-block * 8 + group]
    s = r.signs.T.reshape(nb, 8, 4)
    sas = s[:, :, 0] | (s[:, :, 1] << 7) | (s[:, :, 2] << 14) | (s[:, :, 3] << 21) | (l << 28)
    sas_bytes = torch.stack([(sas >> (8 * i)) & 0xFF for i in range(4)], dim=2).reshape(nb, 32)
    body = torch.cat([qs, sas_bytes], dim=1).to(torch.uint8)
    body.masked_fill_(~live[:, None], 0)  # an all-zero block keeps only zero bytes
    return torch.cat([fp16_bytes(d16.float()), body], dim=1)


def quantize_iq3_s(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """[nb, 256] -> [nb, 110]: d, qs[64] (low 8 bits of the 9-bit indices), qh[8] (bit 8 of
    group k of sub-block ib at bit k of qh[ib]), signs[32], scales[4] (two 4-bit scales each)."""
    nb = x.shape[0]
    r = grid_search(x, _weights(x, qw), IQ3_S)
    d16, l, live = sub_scales(r.scale, nb, 1.033)
    idx = r.index.T.reshape(nb, 8, 8)  # [block, sub-block, group]
    zero = r.zero.view(nb, 8)
    # ggml's write pointers skip zero sub-blocks: live sub-block ib writes slot (# live before ib);
    # zero ones write nowhere (slot 8, dropped).
    slot = torch.where(zero, 8, torch.cumsum((~zero).long(), dim=1) - 1)
    qs = torch.zeros((nb, 9, 8), dtype=torch.int64, device=x.device)
    qs.scatter_(1, slot[:, :, None].expand(nb, 8, 8), idx & 0xFF)
    signs = torch.zeros((nb, 9, 4), dtype=torch.int64, device=x.device)
    signs.scatter_(1, slot[:, :, None].expand(nb, 8, 4), r.signs.T.reshape(nb, 8, 4))
    qh = ((idx >> 8) << torch.arange(8, device=x.device)).sum(dim=2)  # [nb, 8]
    scales = l[:, 0::2] | (l[:, 1::2] << 4)
    body = torch.cat([qs[:, :8].reshape(nb, 64), qh, signs[:, :8].reshape(nb, 32), scales], dim=1)
    return torch.cat([fp16_bytes(d16.float()), body.to(torch.uint8)], dim=1)


def _sign_values(bits: torch.Tensor) -> torch.Tensor:
    """[..., k] sign bytes -> [..., k, 8] float32 ±1 (bit i set: weight i negative)."""
    b = (bits.long()[..., None] >> torch.arange(8, device=bits.device)) & 1
    return 1.0 - 2.0 * b.float()


def dequantize_iq3_xxs(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    grid = grid_tables("IQ3_XXS", b.device).values
    sas = b[:, 66:98].contiguous().view(torch.int32).long() & 0xFFFFFFFF  # [nb, 8]
    db = (f16(b, 0) * ((sas >> 28).float() + 0.5)) * 0.5  # gguf: d * (0.5 + l) * 0.5
    s7 = torch.stack([(sas >> (7 * k)) & 127 for k in range(4)], dim=2)  # [nb, 8, 4]
    sign = _sign_values(ksigns(b.device)[s7]).view(nb, 8, 32)
    g = grid[b[:, 2:66].long()].view(nb, 8, 32)
    out.view(nb, 8, 32).copy_((db[:, :, None] * g) * sign)


def dequantize_iq3_s(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    grid = grid_tables("IQ3_S", b.device).values
    qh = b[:, 66:74].long()
    high = ((qh[:, :, None] >> torch.arange(8, device=b.device)) & 1).reshape(nb, 64)
    g = grid[b[:, 2:66].long() | (high << 8)].view(nb, 8, 32)
    sc = b[:, 106:110]
    l = torch.stack([sc & 15, sc >> 4], dim=2).reshape(nb, 8)
    db = f16(b, 0) * (1 + 2 * l).float()  # gguf: d * (1 + 2*scales)
    sign = _sign_values(b[:, 74:106]).view(nb, 8, 32)
    out.view(nb, 8, 32).copy_((db[:, :, None] * g) * sign)


TYPES = {
    GGMLType.IQ3_XXS: GGMLKernels(per_block(quantize_iq3_xxs, QK_K), dequantize_iq3_xxs),
    GGMLType.IQ3_S: GGMLKernels(per_block(quantize_iq3_s, QK_K), dequantize_iq3_s),
}
