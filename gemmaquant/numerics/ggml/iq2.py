"""IQ2_XXS, IQ2_XS and IQ2_S: 8 weights per grid point of 3 levels, with 4-bit sub-block scales.

Quantizers are byte-identical to `ggml_quantize_chunk` (`quantize_row_iq2_{xxs,xs,s}_impl`) and
take the blocks of a row chunk, `x [nb, 256]` float32, and the importance weights tiled to the
same shape (`qw`). IQ2_XXS and IQ2_XS cannot run without an importance matrix (ggml asserts, and
`quantize.quantize` refuses); IQ2_S uses `0.25*sigma2 + x²` then. The search is
`iqgrid.grid_search`:
* IQ2_XXS: 256-point grid, sub-blocks of 32, parity signs; the scan starts from
  `make_qp_quants(32, 4)` and every group is re-rounded at the kept scale.
* IQ2_XS: 512-point grid, sub-blocks of 16, parity signs.
* IQ2_S: 1024-point grid, sub-blocks of 16, all 8 sign bits stored.

Dequantizers `(b [nb, bytes] uint8, out [nb, 256] float32)` write gguf-py's
`((d*(0.5+l))*0.25)*grid*sign`, grids and `ksigns` from the gguf package.
"""

from __future__ import annotations

import torch

from gemmaquant.numerics.ggml.iqgrid import GridSpec, grid_search, sub_scales
from gemmaquant.numerics.ggml.iqgrid_tables import grid_tables, ksigns
from gemmaquant.numerics.ggml.fields import f16, fp16_bytes
from gemmaquant.numerics.ggml.search import div, f32, seq_sum, sqrt
from gemmaquant.numerics.ggml.family import GGMLKernels, per_block
from gemmaquant.numerics.ggml.types import QK_K, GGMLType

IQ2_XXS = GridSpec(grid="IQ2_XXS", sub=32, steps=(6, 0.1), parity=True, on_grid_init=True,
                   requant_all=True, eps=f32(1e-15), qp_start=True)  # fmt: skip
IQ2_XS = GridSpec(grid="IQ2_XS", sub=16, steps=(9, 0.1), parity=True, on_grid_init=True,
                  requant_all=False, eps=f32(1e-15))  # fmt: skip
IQ2_S = GridSpec(grid="IQ2_S", sub=16, steps=(9, 0.1), parity=False, on_grid_init=True,
                 requant_all=False, eps=f32(1e-8))  # fmt: skip


def _sigma2(x: torch.Tensor, factor: float) -> torch.Tensor:
    """factor*Σx²/256 per 256 block: [nb, 1]."""
    xt = x.T.contiguous()
    return div(factor * seq_sum(xt * xt), 256.0)[:, None]


def _u16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[nb, k] values < 2^16 -> [nb, 2k] little-endian bytes."""
    return torch.stack([v & 0xFF, v >> 8], dim=2).reshape(v.shape[0], -1)


def quantize_iq2_xxs(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """[nb, 256] -> [nb, 66]: d, then per 32 weights a u32 of 4 grid indices (bytes) and a u32 of
    4 x 7 sign bits with the 4-bit scale in bits 28..31."""
    nb = x.shape[0]
    r = grid_search(x, qw * sqrt(_sigma2(x, 1.0) + x * x), IQ2_XXS)
    d16, l, live = sub_scales(r.scale, nb, None)
    idx = r.index.T.reshape(nb, 8, 4)
    s = r.signs.T.reshape(nb, 8, 4)
    aux = s[:, :, 0] | (s[:, :, 1] << 7) | (s[:, :, 2] << 14) | (s[:, :, 3] << 21) | (l << 28)
    aux_bytes = torch.stack([(aux >> (8 * i)) & 0xFF for i in range(4)], dim=2)  # [nb, 8, 4]
    body = torch.cat([idx, aux_bytes], dim=2).reshape(nb, 64).to(torch.uint8)
    body.masked_fill_(~live[:, None], 0)
    return torch.cat([fp16_bytes(d16.float()), body], dim=1)


def quantize_iq2_xs(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """[nb, 256] -> [nb, 74]: d, qs u16[32] (9-bit grid index | 7 sign bits << 9), scales[8]."""
    nb = x.shape[0]
    r = grid_search(x, qw * sqrt(_sigma2(x, 1.0) + x * x), IQ2_XS)
    d16, l, live = sub_scales(r.scale, nb, None)
    q2 = (r.index | (r.signs << 9)).T.reshape(nb, 32)  # [block, 2*sub-block + group]
    body = torch.cat([_u16_bytes(q2), l[:, 0::2] | (l[:, 1::2] << 4)], dim=1).to(torch.uint8)
    body.masked_fill_(~live[:, None], 0)
    return torch.cat([fp16_bytes(d16.float()), body], dim=1)


def quantize_iq2_s(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """[nb, 256] -> [nb, 82]: d, qs[32] (low 8 bits of the 10-bit indices), signs[32], qh[8]
    (bits 8..9 of index i at bits 2*(i%4) of qh[i/4]), scales[8]."""
    nb = x.shape[0]
    sigma2 = _sigma2(x, 2.0)
    w = (sigma2 * 0.25) + x * x if qw is None else qw * sqrt(sigma2 + x * x)
    r = grid_search(x, w, IQ2_S)
    d16, l, live = sub_scales(r.scale, nb, 0.9875)
    idx = r.index.T.reshape(nb, 32)
    signs = r.signs.T.reshape(nb, 32)
    qh = ((idx >> 8).view(nb, 8, 4) << torch.tensor([0, 2, 4, 6], device=x.device)).sum(dim=2)
    body = torch.cat([idx & 0xFF, signs, qh, l[:, 0::2] | (l[:, 1::2] << 4)], dim=1)
    return torch.cat([fp16_bytes(d16.float()), body.to(torch.uint8)], dim=1)


def _sign_values(bits: torch.Tensor) -> torch.Tensor:
    """[..., k] sign bytes -> [..., k, 8] float32 ±1 (bit i set: weight i negative)."""
    b = (bits.long()[..., None] >> torch.arange(8, device=bits.device)) & 1
    return 1.0 - 2.0 * b.float()


def _db(b: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """(d*(0.5 + l))*0.25 for sub-scales l [nb, k]."""
    d = f16(b, 0)
    return (d * (l.float() + 0.5)) * 0.25


def _nibbles(sc: torch.Tensor) -> torch.Tensor:
    """[nb, 8] bytes -> [nb, 16] 4-bit scales, low nibble first."""
    return torch.stack([sc & 15, sc >> 4], dim=2).reshape(sc.shape[0], 16)


def dequantize_iq2_xxs(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    grid = grid_tables("IQ2_XXS", b.device).values
    q = b[:, 2:66].reshape(nb, 8, 8)
    aux = q[:, :, 4:].contiguous().view(torch.int32).long().squeeze(2) & 0xFFFFFFFF  # [nb, 8]
    db = _db(b, aux >> 28)
    s7 = torch.stack([(aux >> (7 * k)) & 127 for k in range(4)], dim=2)
    sign = _sign_values(ksigns(b.device)[s7]).view(nb, 8, 32)
    g = grid[q[:, :, :4].long()].view(nb, 8, 32)
    out.view(nb, 8, 32).copy_((db[:, :, None] * g) * sign)


def dequantize_iq2_xs(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    grid = grid_tables("IQ2_XS", b.device).values
    q = b[:, 2:66].contiguous().view(torch.int16).long() & 0xFFFF  # [nb, 32]
    db = _db(b, _nibbles(b[:, 66:74]))  # [nb, 16]
    sign = _sign_values(ksigns(b.device)[q >> 9]).view(nb, 16, 16)
    g = grid[q & 511].view(nb, 16, 16)
    out.view(nb, 16, 16).copy_((db[:, :, None] * g) * sign)


def dequantize_iq2_s(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    grid = grid_tables("IQ2_S", b.device).values
    qh = b[:, 66:74].long()
    high = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(nb, 32)
    g = grid[b[:, 2:34].long() | (high << 8)].view(nb, 16, 16)
    db = _db(b, _nibbles(b[:, 74:82]))
    sign = _sign_values(b[:, 34:66]).view(nb, 16, 16)
    out.view(nb, 16, 16).copy_((db[:, :, None] * g) * sign)


TYPES = {
    GGMLType.IQ2_XXS: GGMLKernels(per_block(quantize_iq2_xxs, QK_K), dequantize_iq2_xxs, needs_imatrix=True),
    GGMLType.IQ2_XS: GGMLKernels(per_block(quantize_iq2_xs, QK_K), dequantize_iq2_xs, needs_imatrix=True),
    GGMLType.IQ2_S: GGMLKernels(per_block(quantize_iq2_s, QK_K), dequantize_iq2_s),
}
