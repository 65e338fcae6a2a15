"""Least-squares refit of a GGML tensor's fp16 scale fields once its codes are fixed (issue 21:
"optionally refit the scales after").

Error feedback (`ggml_gptq.py`) chooses codes inside the scales llama.cpp's search picked for the
original weights; those scales were fitted to llama.cpp's codes, not to ours. In every scalar type a
block's values are linear in its fp16 fields, with the codes and the integer sub-scales fixed:
`v = Σ_k f_k · basis_k`, e.g. Q4_0 `d·(q − 8)`, Q4_1 `d·q + m`, Q4_K `d·sc·q − dmin·m`, Q6_K
`d·sc·(q − 32)`, IQ4_XS `d·(ls − 32)·kv[q]`. So each row's fields can be solved exactly for the
layer-output loss: `min_f (w − Bf) H (w − Bf)ᵀ`, one small dense system per row (its unknowns are the
row's blocks × fields; H couples the blocks), then rounded to fp16 as the block stores them.

Only the fp16 fields change: the integer sub-scales, the codes, the block layout and the file size stay.
A row keeps its old fields unless the rounded solution lowers its loss, so a refit never makes a row
worse on the calibration inputs. With two fields (a scale and a min), the solution is rounded two ways (both
fields at once; the scale first, then the min re-solved for it) and each row keeps the better.
"""

from __future__ import annotations

import torch

from ..numerics.ggml.types import BLOCK, GGMLType
from . import hessian
from .ggml_codes import sub_grid
from .threads import parallel_map

T = GGMLType

# byte offsets of the fp16 fields in a block that multiply the codes (first) and the mins (second)
FIELDS = {T.Q4_0: (0,), T.Q5_0: (0,), T.Q8_0: (0,), T.IQ4_NL: (0,), T.Q4_1: (0, 2), T.Q5_1: (0, 2),
          T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,)}
_ROWS_PER_CHUNK_ELEMS = 1 << 24  # bound on the [rows, n, unknowns] float64 product per chunk (128 MiB)
_ROWS_PER_SLICE_ELEMS = 1 << 24  # weights refitted at a time (`refit`): 128 MB per float64 copy


def _with_fields(b: torch.Tensor, offsets: tuple[int, ...], values: torch.Tensor) -> torch.Tensor:
    """A copy of blocks b [nb, bytes] whose fp16 fields hold values [nb, K] (uint8 [nb, 2] per field)."""
    out = b.clone()
    for k, at in enumerate(offsets):
        out[:, at:at + 2] = values[:, k:k + 1].to(torch.float16).view(torch.uint8).view(-1, 2)
    return out


def _fields(b: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([b[:, at:at + 2].contiguous().view(torch.float16)[:, 0] for at in offsets], dim=1).float()


def bases(data: torch.Tensor, qtype: GGMLType, codes: torch.Tensor) -> torch.Tensor:
    """[rows, nb, K, block] float64: what each fp16 field contributes to the block's values per unit,
    from the block's own codes and integer sub-scales (decoded with the fields set to unit vectors)."""
    rows, n = codes.shape
    size, nbytes = BLOCK[qtype]
    offsets = FIELDS[qtype]
    b = data.reshape(-1, nbytes)
    out = []
    for k in range(len(offsets)):
        unit = torch.zeros(b.shape[0], len(offsets))
        unit[:, k] = 1.0
        grid = sub_grid(_with_fields(b, offsets, unit).view(rows, -1), qtype, rows)
        out.append(grid.values(codes).double().view(rows, n // size, size))
    return torch.stack(out, dim=2)


def _normal_by_blocks(H: torch.Tensor, Bf: torch.Tensor) -> torch.Tensor:
    """Bᵀ H B [r, p, p] (float32) for the rows' bases Bf [r, nb, K, size] on a wide input (H [n, n]), one
    block of H's rows at a time. The one-product form makes H·B [r, n, p] at once, which on a wide input
    allows only a few rows per product, each re-reading all of H (31B's down_proj: 1.85 GB per 4 rows,
    memory-bound). Here block c's basis vectors of all the chunk's rows meet H's rows of block c in one
    product, only up to block c (A is symmetric: the blocks below are the transposes), and each block's
    sums are a batched product of small contiguous matrices (RESULTS.md §11, twelfth round: against the
    earlier way by block column with an einsum). The blocks are jobs of `threads.parallel_map`."""
    r, nb, K, size = Bf.shape
    A = torch.empty(r, nb, K, nb, K)
    Bc = Bf.transpose(0, 1).reshape(nb, r * K, size)  # per block: the chunk's basis vectors [r·K, size]

    def block(c):  # writes A's blocks (b, c) and (c, b), b ≤ c: no two jobs write the same place
        m = (c + 1) * size
        # T[r, b, q, i] = Σ_j β_{r,c,q}[j] H[c·size + j, b·size + i], for the blocks b ≤ c
        T = (Bc[c] @ H[c * size:m, :m].float()).view(r, K, c + 1, size).transpose(1, 2)
        blk = torch.matmul(Bf[:, :c + 1], T.transpose(-1, -2))  # [r, b, k, q]: β_{r,b,k}ᵀ H[b, c] β_{r,c,q}
        A[:, :c + 1, :, c, :] = blk
        A[:, c, :, :c, :] = blk[:, :c].permute(0, 3, 1, 2)

    parallel_map(block, reversed(range(nb)))  # the biggest first: the threads end together
    return A.view(r, nb * K, nb * K)


def refit(W: torch.Tensor, H: torch.Tensor, data: torch.Tensor, qtype: GGMLType, codes: torch.Tensor, *,
          ridge: float = 1e-12) -> torch.Tensor:
    """`data` [rows, row_bytes] uint8 with each row's fp16 fields re-solved for its codes (see the module
    doc); rows whose loss the rounded solution does not lower keep their bytes."""
    return refit_with_losses(W, H, data, qtype, codes, ridge=ridge)[0]


def refit_with_losses(W: torch.Tensor, H: torch.Tensor, data: torch.Tensor, qtype: GGMLType, codes: torch.Tensor,
                      *, ridge: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(`refit`'s bytes, each row's loss with them [rows] float64): the refit compares the rows' losses
    anyway, so its caller need not take them again (on 31B's down_proj one product is a minute).
    Rows are independent: they are refitted a slice at a time, so that the float64 temporaries (a few
    per weight) stay small for big tensors (31B's 5376 × 21504 down_proj: 0.9 GB per float64 copy)."""
    rows, n = W.shape
    Hr = H.float().view(n, n // BLOCK[qtype][0], BLOCK[qtype][0]) if n <= hessian.WIDE else None
    out = torch.empty_like(data)
    losses = torch.empty(rows, dtype=torch.float64)
    step = max(1, _ROWS_PER_SLICE_ELEMS // n)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        out[r0:r1], losses[r0:r1] = _refit_rows(W[r0:r1], H, Hr, data[r0:r1], qtype, codes[r0:r1], ridge)
    return out, losses


def _refit_rows(W: torch.Tensor, H: torch.Tensor, Hr: torch.Tensor | None, data: torch.Tensor, qtype: GGMLType,
                codes: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = W.shape
    size, nbytes = BLOCK[qtype]
    offsets = FIELDS[qtype]
    K, nb = len(offsets), n // size
    p = nb * K
    Bs = bases(data, qtype, codes)  # [rows, nb, K, size]
    WH = hessian.matmul_h(W, H)  # float64 (a wide H's products float32, without a copy of it)
    # the normal equations in float32 (the costly product, n² per row),
    # solved in float64: their error is far below the fp16 rounding of the result, and a row only
    # changes if its loss drops
    sol = torch.empty(rows, p, dtype=torch.float64)
    sol_joint = torch.empty(rows, p, dtype=torch.float64) if K == 2 else None
    step = max(1, _ROWS_PER_CHUNK_ELEMS // (n * p))
    eye = torch.eye(p, dtype=torch.float64)
    wide = Hr is None  # `refit_with_losses` decided: the input is wider than hessian.WIDE
    if wide:  # rows at a time: their basis [r, n, K], one block's H·basis and A within 64 MB
        step = max(1, min(_ROWS_PER_CHUNK_ELEMS // (4 * n * K), _ROWS_PER_CHUNK_ELEMS // (4 * p * p)))
    for r0 in range(0, rows, step):
        B = Bs[r0:r0 + step]  # [r, nb, K, size]
        Bf = B.float()
        if wide:
            A = _normal_by_blocks(H, Bf).double()
        else:  # one product (bit for bit the earlier bytes)
            Tm = torch.einsum("nbi,rbki->rnbk", Hr, Bf).reshape(B.shape[0], nb, size, p)  # H·basis, by column
            A = torch.einsum("rbki,rbiq->rbkq", Bf, Tm).reshape(B.shape[0], p, p).double()
        g = (B * WH[r0:r0 + step].view(-1, nb, 1, size)).sum(-1).reshape(B.shape[0], p)
        lam = ridge * A.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)
        f = torch.linalg.solve(A + lam[:, None, None] * eye, g)
        if K == 2:  # round the scales first, then solve the mins for the rounded scales: d and m are
            # strongly correlated, and rounding both independently can cost more than the refit gains
            # (not always: each row keeps the better of the two, below)
            sol_joint[r0:r0 + step] = f
            d = f[:, 0::2].to(torch.float16).double()
            A11 = A[:, 1::2, 1::2]
            g1 = g[:, 1::2] - (A[:, 1::2, 0::2] @ d[:, :, None])[:, :, 0]
            lam1 = ridge * A11.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)
            f = torch.stack([d, torch.linalg.solve(A11 + lam1[:, None, None] * eye[:nb, :nb], g1)], dim=2).view(-1, p)
        sol[r0:r0 + step] = f
    blocks = data.reshape(-1, nbytes)
    old_f = _fields(blocks, offsets)
    best, best_loss = data, hessian.error_losses(W, sub_grid(data, qtype, rows).values(codes), H)
    for cand in [sol] + ([sol_joint] if K == 2 else []):
        new_f = cand.view(-1, K).float()
        finite = torch.isfinite(new_f.to(torch.float16).float()).all(dim=1, keepdim=True)
        new = _with_fields(blocks, offsets, torch.where(finite, new_f, old_f)).view(rows, -1)
        loss = hessian.error_losses(W, sub_grid(new, qtype, rows).values(codes), H)
        better = loss < best_loss
        best, best_loss = torch.where(better[:, None], new, best), torch.where(better, loss, best_loss)
    return best, best_loss
