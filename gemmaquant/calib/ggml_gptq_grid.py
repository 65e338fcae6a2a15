"""Error-feedback rounding for IQ3_S, whose codes are vectors: 4 weights take one of 512 grid points.

IQ3_S stores, per 32-weight sub-block, a scale `db = d·(1 + 2l)` (fp16 d per 256 weights, 4-bit l),
and per group of 4 consecutive weights a 9-bit grid index and 4 free sign bits: the values are
`db · grid[idx] · sign`. The codes of one group cannot change one weight at a time, so the error
feedback works group by group (block GPTQ, as in GPTVQ, van Baalen et al. 2024):

* llama.cpp's quantizer runs first with the imatrix; its fp16 d and 4-bit l are kept (the scale search
  is llama.cpp's), only grid indices and signs change;
* groups are taken in (act-)order; a group's 4 current weights w choose the grid point and signs that
  minimise the loss GPTQ charges for fixing them, ||(w − v)·U_gg⁻¹||² with U_gg the group's 4×4 block
  of the upper Cholesky factor of H⁻¹ (the exact increase of ||X(W − Ŵ)ᵀ||² once the later columns
  are compensated). Signs follow w's signs; the grid point is searched exhaustively (512 candidates);
* the group's error is then fed forward column by column, as GPTQ does for fixed values.

A block llama.cpp wrote with an exactly-zero sub-block (its writer then shifts the later grid slots,
see ggml/iq3.py) or with d = 0 keeps llama.cpp's bytes and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..numerics.ggml.dequantize import dequantize
from ..numerics.ggml.iqgrid_tables import grid_tables
from ..numerics.ggml.quantize import quantize
from ..numerics.ggml.types import GGMLType
from .ggml_gptq import DAMP, HessianFactor, Optimized, feed_forward, hessian_factor, layer_loss
from .spill import Held, held
from .threads import single_thread

GRID_TYPES = (GGMLType.IQ3_S,)
_BYTES = 110  # IQ3_S block: d(2) qs(64) qh(8) signs(32) scales(4)


@dataclass
class GridRounding:
    data: torch.Tensor  # [rows, row_bytes] uint8: llama.cpp's bytes
    values: torch.Tensor  # [rows, n] float32: llama.cpp's decoded values
    db: torch.Tensor  # [rows, n/32] float32: each sub-block's scale d*(1+2l)
    frozen: torch.Tensor  # [rows, n/256] bool: blocks whose bytes stay llama.cpp's
    grid: torch.Tensor  # [512, 4] float32: the grid points' magnitudes


def llama_grid_rounding(W: torch.Tensor, imatrix: torch.Tensor | None) -> GridRounding:
    rows, n = W.shape
    data = quantize(W, GGMLType.IQ3_S, imatrix)
    values = dequantize(data, GGMLType.IQ3_S, (rows, n))
    b = data.view(-1, _BYTES)
    d = b[:, 0:2].contiguous().view(torch.float16).float()  # [nb, 1]
    sc = b[:, 106:110].long()
    l = torch.stack([sc & 15, sc >> 4], dim=2).view(-1, 8)
    db = (d * (1 + 2 * l).float()).view(rows, -1)  # gguf: d * (1 + 2*scales)
    zero_sub = (W.view(-1, 8, 32) == 0).all(dim=2).any(dim=1)  # the writer's slot shift
    frozen = (zero_sub | (d[:, 0] == 0)).view(rows, -1)
    return GridRounding(data, values, db, frozen, grid_tables("IQ3_S").values)


def _choose(w: torch.Tensor, db: torch.Tensor, Linv: torch.Tensor, grid: torch.Tensor):
    """w [rows, 4] current weights, db [rows] scales, Linv [4, 4] -> (index [rows], sign bits [rows, 4]
    (1: negative), values [rows, 4]) minimising ||(w − v)·Linv||² over the 512 grid points."""
    neg = w < 0
    s = 1.0 - 2.0 * neg.float()  # [rows, 4]
    mag = grid[None, :, :] * s[:, None, :]  # [rows, 512, 4]: g·sign
    cand = db[:, None, None] * mag
    err = (w[:, None, :] - cand) @ Linv  # [rows, 512, 4]
    idx = (err * err).sum(dim=2).argmin(dim=1)  # first minimum
    v = db[:, None] * (grid[idx] * s)  # gguf: (db*grid)*sign, the same float32 product
    return idx, neg, v


def grid_gptq(W: torch.Tensor, f: HessianFactor, r: GridRounding, *, block_size: int = 128):
    """(index [rows, n/4], negative [rows, n] bool, values [rows, n]) by block error feedback with
    the factor `f` of H (group 4)."""
    rows, n = W.shape
    if f.group != 4:
        raise ValueError("IQ3_S error feedback needs a Hessian factor with groups of 4 columns")
    perm, U = f.perm, f.U
    Wt = W.float().T[perm].contiguous()  # [n, rows]
    base = r.values.T[perm]  # llama.cpp's values, for frozen blocks
    frozen_col = r.frozen.repeat_interleave(256, dim=1).T[perm]  # [n, rows]
    index = torch.zeros(rows, n // 4, dtype=torch.long)
    neg = torch.zeros(rows, n, dtype=torch.bool)
    values = torch.empty(n, rows)
    block_size = max(4, block_size // 4 * 4)
    groups = (perm[0::4] // 4).tolist()
    with single_thread():
        for i1 in range(0, n, block_size):
            i2 = min(i1 + block_size, n)
            W1 = Wt[i1:i2]
            Err1 = torch.empty_like(W1)
            for k in range(0, i2 - i1, 4):
                a = i1 + k
                g = groups[a // 4]
                Linv = torch.linalg.inv(U[a:a + 4, a:a + 4])
                idx, ng_bits, v = _choose(W1[k:k + 4].T, r.db[:, (4 * g) // 32], Linv, r.grid)
                v = torch.where(frozen_col[a][:, None], base[a:a + 4].T, v)
                index[:, g] = idx
                neg[:, 4 * g:4 * g + 4] = ng_bits
                vt = v.T  # [4, rows]
                values[a:a + 4] = vt
                for j in range(4):
                    err = (W1[k + j] - vt[j]) / U[a + j, a + j]
                    if k + j + 1 < i2 - i1:
                        W1[k + j + 1:] -= U[a + j, a + j + 1:i2, None] * err[None, :]
                    Err1[k + j] = err
            feed_forward(Wt, U, Err1, i1, i2)
    out = torch.empty_like(values)
    out[perm] = values
    return index, neg, out.T.contiguous()


def pack_grid(r: GridRounding, index: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """llama.cpp's bytes with the grid indices and signs of every non-frozen block replaced."""
    rows = r.data.shape[0]
    b = r.data.clone().view(-1, _BYTES)
    nb = b.shape[0]
    idx = index.reshape(nb, 8, 8)  # [block, sub-block, group]
    qs = (idx & 0xFF).reshape(nb, 64).to(torch.uint8)
    qh = ((idx >> 8) << torch.arange(8)).sum(dim=2).to(torch.uint8)  # bit k of qh[ib]: group k's bit 8
    signs = (neg.reshape(nb, 32, 8).long() << torch.arange(8)).sum(dim=2).to(torch.uint8)
    new = torch.cat([qs, qh, signs], dim=1)
    keep = r.frozen.reshape(-1)
    b[:, 2:106] = torch.where(keep[:, None], b[:, 2:106], new)
    return b.view(rows, -1)


def optimize_grid_tensor(W: torch.Tensor, H: torch.Tensor | Held, qtype: GGMLType, imatrix: torch.Tensor | None, *,
                         feedback: bool = True, damp: float = DAMP, act_order: bool = True,
                         block_size: int = 128, factor: HessianFactor | None = None,
                         release: bool = False) -> Optimized:
    """IQ3_S: llama.cpp's scales, grid points and signs by block error feedback (see the module doc).
    `feedback=False`: each group's nearest grid point in plain squared error (not llama.cpp's codes,
    which are picked at the unrounded scale). llama.cpp's bytes are kept if ours do not lower
    ||X(W − Ŵ)ᵀ||². `factor`: `hessian_factor(H, group=4, ...)` if already computed; `release` and a
    `spill.Held` H: as in `ggml_gptq.optimize_tensor`."""
    if GGMLType(qtype) not in GRID_TYPES:
        raise ValueError(f"grid error feedback supports {', '.join(t.name for t in GRID_TYPES)}")
    W = W.float()
    h = held(H)
    with single_thread():
        r = llama_grid_rounding(W, imatrix)
    if feedback:
        h.park()
        release = release or factor is None
        factor = factor or hessian_factor(h, damp=damp, act_order=act_order, group=4)
    else:
        release = False
        factor = hessian_factor(torch.eye(W.shape[1], dtype=torch.float64), damp=0.0, act_order=False, group=4)
    index, neg, values = grid_gptq(W, factor, r, block_size=block_size)
    if release:
        factor.release()
    H = h.get()
    loss_llama = layer_loss(W, r.values, H)
    loss = layer_loss(W, values, H)
    if loss >= loss_llama:
        return Optimized(r.data, r.values, loss_llama, loss_llama)
    return Optimized(pack_grid(r, index, neg), values, loss_llama, loss)
