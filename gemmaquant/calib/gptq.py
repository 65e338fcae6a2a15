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
"""

from __future__ import annotations

import torch

from .intq import WeightQuant, minmax_qparams, qrange

_MAX_DAMP_TRIES = 6


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)⁻¹, in float64; raises the damping until H is PD."""
    H = H.double()
    mean_diag = H.diagonal().mean().item() or 1.0
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(_MAX_DAMP_TRIES):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                return U
        damp *= 10
    raise ValueError(f"Hessian is not positive definite even with damping {damp / 10:g}")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int | None,
                  symmetric: bool = True, damp: float = 0.01, act_order: bool = True,
                  block_size: int = 128) -> WeightQuant:
    """W [out, in] (any float), H [in, in] = Σ xᵀx of the layer input → codes/scales/zero points.

    group_size None: one scale per output row (per-channel).
    """
    rows, cols = W.shape
    gs = cols if group_size is None else group_size
    if cols % gs:
        raise ValueError(f"in_features {cols} is not a multiple of the group size {gs}")
    qmin, qmax = qrange(bits)
    W = W.float().clone()
    H = H.double().clone()
    dead = H.diagonal() == 0  # inputs never seen: no information, quantize as zero like the reference
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    invperm = torch.argsort(perm)
    W = W[:, perm]
    Hinv = _inverse_cholesky(H[perm][:, perm], damp).float()

    n_groups = cols // gs
    scale = torch.zeros(rows, n_groups)
    zero = torch.zeros(rows, n_groups)
    have = torch.zeros(n_groups, dtype=torch.bool)
    group_of = perm // gs  # permuted position → group (of its original column)
    codes = torch.zeros(rows, cols)  # in permuted order

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of[i1 + i].item()
            if not have[g]:
                cur = _current_group(W, W1, Err1, Hinv, invperm[g * gs:(g + 1) * gs], i1, i2, i)
                s, z = minmax_qparams(cur, bits, symmetric)
                scale[:, g] = s
                zero[:, g] = 0 if z is None else z
                have[g] = True
            w = W1[:, i]
            s, z = scale[:, g], zero[:, g]
            q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
            codes[:, i1 + i] = q
            err = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    codes = codes[:, invperm].to(torch.int8)
    zp = None if symmetric else zero.to(torch.int8)
    return WeightQuant(codes, scale.to(torch.bfloat16), zp, bits, group_size)


def _current_group(W, W1, Err1, Hinv, positions, i1, i2, i):
    """Current (error-compensated) values [rows, gs] of the columns at permuted `positions` (all ≥ i1+i).

    Columns inside the block are up to date in W1; those after it still miss the updates from this
    block's first i columns, which are applied here without touching W.
    """
    out = torch.empty(W.shape[0], len(positions))
    inside = positions < i2
    if inside.any():
        out[:, inside] = W1[:, positions[inside] - i1]
    after = positions[~inside]
    if len(after):
        out[:, ~inside] = W[:, after] - Err1[:, :i] @ Hinv[i1:i1 + i, after]
    return out
