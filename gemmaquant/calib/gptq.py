"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): quantize a weight column by column and spread each
column's rounding error over the columns not yet quantized, using the inverse Hessian of the layer's
reconstruction loss ||X Wᵀ − X Ŵᵀ||², H = XᵀX.

    Hinv = chol(inv(H + λ·mean(diag H)·I))ᵀ  (upper Cholesky factor of the inverse; λ = `damp`)
    for column j (in processing order):   q_j = Q(w_j);   e = (w_j − q_j) / Hinv[j, j]
                                          w_k −= e · Hinv[j, k]   for all later columns k
The updates are applied lazily per block of `block_size` columns (same result, cache-friendly).

Act-order (static, "weight" in compressed-tensors' terms) processes columns by decreasing diag(H) but
keeps groups CONTIGUOUS in the original column order, so no g_idx is needed on disk. A group's
scale/zero point is computed when the first of its columns comes up, from the group's *current*
(error-compensated) weights — exactly what plain GPTQ does at each group start, generalised to a
permuted order. Without act-order this is the published algorithm (groups found at column j ≡ 0 mod gs).

Two refinements of the group scales (both optional, both can only lower the calibration loss they
measure):
  * mse: the scale found at group entry comes from a clip search (`search_qparams`) weighting column
    j's rounding error by 1/Hinv[j, j]², the loss GPTQ's own update charges for it (OBQ);
  * refit: after all codes are fixed, each row's group scales are re-solved by least squares on the
    layer's true loss: ŵ = Σ_g s_g·(q_g − z_g) is linear in s, so s = (BᵀHB)⁻¹BᵀHw with B the row's
    codes spread over the group columns — G unknowns per row (5 for a 640-wide input).
"""

from __future__ import annotations

import torch

from ..numerics.ct.grid import WeightQuant, minmax_qparams, search_qparams
from ..numerics.ct.quantize import int_range
from .hessian import inverse_cholesky, matmul_h, row_losses, seen_diagonal


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int | None,
                  symmetric: bool = True, damp: float = 0.01, act_order: bool = True,
                  block_size: int = 128, mse: bool = False, refit: bool = False) -> WeightQuant:
    """W [out, in] (any float), H [in, in] = Σ xᵀx of the layer input → codes/scales/zero points.

    group_size None: one scale per output row (per-channel). mse / refit: see the module docstring.
    """
    q = _gptq(W, H, bits=bits, group_size=group_size, symmetric=symmetric, damp=damp, act_order=act_order,
              block_size=block_size, mse=mse)
    return refit_scales(W, H, q) if refit else q


def _gptq(W, H, *, bits, group_size, symmetric, damp, act_order, block_size, mse) -> WeightQuant:
    rows, cols = W.shape
    gs = cols if group_size is None else group_size
    if cols % gs:
        raise ValueError(f"in_features {cols} is not a multiple of the group size {gs}")
    qmin, qmax = int_range(bits)
    W = W.float().clone()
    diag = H.diagonal().double()
    dead = diag == 0  # inputs never seen: no information, quantize as zero like the reference
    diag = seen_diagonal(diag)  # and H_jj = 1, as the factor takes them
    W[:, dead] = 0

    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(cols)
    invperm = torch.argsort(perm)
    W = W[:, perm]
    Hinv = inverse_cholesky(H, damp, perm)

    # Column-major working copies (one row of Wt = one input column), so the per-column loop touches
    # contiguous memory; Python-side bookkeeping avoids a tensor op per column.
    n_groups = cols // gs
    Wt = W.T.contiguous()  # [cols, rows], permuted order
    scale = torch.zeros(n_groups, rows)
    zero = torch.zeros(n_groups, rows)
    have = [False] * n_groups
    group_of = (perm // gs).tolist()  # permuted position → group (of its original column)
    codes = torch.zeros(cols, rows)  # permuted order

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            if not have[g]:
                pos = invperm[g * gs:(g + 1) * gs]
                cur = _current_group(Wt, W1, Err1, Hinv, pos, i1, i2, i)
                if mse:
                    imp = Hinv[pos, pos].pow(-2)
                    sg, zg = search_qparams(cur, bits, symmetric, importance=imp[None, :])
                else:
                    sg, zg = minmax_qparams(cur, bits, symmetric)
                scale[g] = sg
                zero[g] = 0 if zg is None else zg
                have[g] = True
            w = W1[i]
            sc, z = scale[g], zero[g]
            q = torch.clamp(torch.round(w / sc) + z, qmin, qmax)
            codes[i1 + i] = q
            err = (w - (q - z) * sc) / Hinv1[i, i]
            W1[i:] -= Hinv1[i, i:, None] * err[None, :]
            Err1[i] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ Err1

    codes = codes.T
    scale, zero = scale.T, zero.T
    codes = codes[:, invperm].to(torch.int8)
    zp = None if symmetric else zero.to(torch.int8)
    return WeightQuant(codes, scale.to(torch.bfloat16), zp, bits, group_size)


def _current_group(Wt, W1, Err1, Hinv, positions, i1, i2, i):
    """Current (error-compensated) values [rows, gs] of the columns at permuted `positions` (all ≥ i1+i).

    Wt [cols, rows], W1/Err1 [block, rows] (column-major). Columns inside the block are up to date in
    W1; those after it still miss the updates from this block's first i columns, which are applied here
    without touching Wt.
    """
    out = torch.empty(len(positions), Wt.shape[1])
    inside = positions < i2
    if inside.any():
        out[inside] = W1[positions[inside] - i1]
    after = positions[~inside]
    if len(after):
        out[~inside] = Wt[after] - Hinv[i1:i1 + i, after].T @ Err1[:i]
    return out.T


def refit_scales(W: torch.Tensor, H: torch.Tensor, q: WeightQuant, ridge: float = 1e-6) -> WeightQuant:
    """Least-squares group scales for fixed codes: per row, min_s (w − Bs)ᵀ H (w − Bs) (float64).

    Rows where the bf16-rounded solution does not lower the loss (or goes non-positive) keep their scale.
    """
    rows, cols = W.shape
    gs = cols if q.group_size is None else q.group_size
    G = cols // gs
    W = W.double()
    c = q.codes.double()
    if q.zero_point is not None:
        c = c - q.zero_point.double().repeat_interleave(gs, dim=1)
    A = torch.empty(rows, G, G, dtype=torch.float64)
    for h in range(G):  # A[r, g, h] = c_rgᵀ H_gh c_rh (H's rows cast a group at a time: no float64 copy)
        T = c[:, h * gs:(h + 1) * gs] @ H[h * gs:(h + 1) * gs].double()  # [rows, cols]
        A[:, :, h] = (c * T).view(rows, G, gs).sum(-1)
    b = (c * matmul_h(W, H)).view(rows, G, gs).sum(-1)  # [rows, G]
    A = A + ridge * A.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)[:, None, None] * torch.eye(G, dtype=A.dtype)
    s_new = torch.linalg.solve(A, b).to(torch.bfloat16).double()

    def loss(s):  # per row (w − ŵ)ᵀ H (w − ŵ)
        return row_losses(W - c * s.repeat_interleave(gs, dim=1), H)

    s_old = q.scale.double()
    s_new = torch.where((c.view(rows, G, gs) == 0).all(-1), s_old, s_new)  # an all-zero group: any scale
    ok = (s_new > 0).all(1) & (loss(s_new) < loss(s_old))
    scale = torch.where(ok[:, None], s_new, s_old).to(torch.bfloat16)
    return WeightQuant(q.codes, scale, q.zero_point, q.bits, q.group_size)
