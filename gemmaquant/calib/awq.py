"""AWQ-style activation-aware scaling (Lin et al. 2023, arXiv:2306.00978) for group-wise INT4 weights.

Input channels that carry large activations matter most; scaling weight column j up by s_j (and the
input down by s_j, folded exactly, see `fold.py`) gives those columns finer effective resolution on the
group grid. For each producer→consumers mapping, s is searched on a grid

    s = mean|x|^α                      or  (duo) mean|x|^α / mean_norm|W|^(1−α),   α ∈ {0, 1/n, …}
    s ← s / sqrt(max s · min s)

and the candidate minimising the consumers' output error is kept (s = 1 is always a candidate). The
error of a weight perturbation ΔW on inputs X is ||X ΔWᵀ||² = tr(ΔW · XᵀX · ΔWᵀ), so the search needs
only the XᵀX the runner already collects for GPTQ — no stored activations, no extra forward passes.
(Original AWQ measures the parent block's output instead; the linear outputs are a close proxy.)
"""

from __future__ import annotations

import torch

from ..model.gemma import DecoderLayer
from .fold import MAPPINGS, applies, consumer_names, consumers, fold, kv_to_q, q_to_kv_max
from ..numerics.ct.grid import rtn
from .stats import InputStats


def normalized_weight_mean(W: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """mean over rows of |W| / (its group's abs-max), per input column [in]."""
    rows, cols = W.shape
    k = cols if group_size is None else group_size
    g = W.abs().view(rows, cols // k, k)
    return (g / g.amax(-1, keepdim=True).clamp(min=1e-12)).view(rows, cols).mean(0)


def output_error(W: torch.Tensor, H: torch.Tensor, s: torch.Tensor, bits: int, group_size: int | None,
                 symmetric: bool) -> float:
    """tr(ΔW H ΔWᵀ) for ΔW = W − RTN(W·s)/s (W [out, in], H [in, in], s [in])."""
    dW = W - rtn(W * s[None, :], bits, group_size, symmetric).dequantize() / s[None, :]
    return ((dW @ H) * dW).sum().item()


def search_scale(W: torch.Tensor, H: torch.Tensor, x_mean: torch.Tensor, *, bits: int,
                 group_size: int | None, symmetric: bool, n_grid: int = 20,
                 expand=None, reduce=None) -> tuple[torch.Tensor, float, float]:
    """Best scale over the grid → (s, its error, the error of s = 1).

    `expand` maps a candidate s to W's input columns and `reduce` maps column statistics to the scale's
    channels (both identity except for v→o, where one scale serves every query head of a KV group).
    """
    expand = expand or (lambda s: s)
    reduce = reduce or (lambda v: v)
    return grid_search(lambda s: output_error(W, H, expand(s), bits, group_size, symmetric), x_mean,
                       reduce(normalized_weight_mean(W, group_size)), n_grid)


def grid_search(error, x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """AWQ's grid over α (module docstring) for any `error(s)` → (best s, its error, the error of s = 1);
    `w_mean`: the consumers' normalized mean |W| per channel (`normalized_weight_mean`)."""
    x = x_mean.float().clamp(min=1e-4)
    ones = torch.ones_like(x)
    best_s, best = ones, error(ones)
    base = best
    for i in range(1, n_grid):
        a = i / n_grid
        for s in (x.pow(a), x.pow(a) / (w_mean.pow(1 - a) + 1e-4)):
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            err = error(s)
            if err < best:
                best_s, best = s, err
    return best_s, best, base


def awq_layer(layer: DecoderLayer, stats: dict[str, InputStats], *, bits: int, group_size: int | None,
              symmetric: bool, mappings=MAPPINGS, stored_dtype: torch.dtype = torch.bfloat16,
              n_grid: int = 20) -> dict[str, torch.Tensor]:
    """Search and fold AWQ scales for one layer in place; rescales each stats' XᵀX to the new inputs.

    `stats` (keyed by Linear suffix) needs `abs_sum` and `xtx`. Returns {norm attribute: new weight}.
    """
    norms = {}
    for mapping in (m for m in mappings if applies(layer, m)):
        st = stats[consumer_names(mapping, layer)[0]]
        H = st.xtx / max(st.count, 1)
        W = torch.cat([lin.weight.detach().float() for lin in consumers(layer, mapping)])
        x_mean = st.mean_abs
        expand = reduce = None
        if mapping == "o":
            x_mean = q_to_kv_max(layer, x_mean)
            expand = lambda s: kv_to_q(layer, s)  # noqa: E731
            reduce = lambda v: q_to_kv_max(layer, v)  # noqa: E731
        s, _, _ = search_scale(W, H, x_mean, bits=bits, group_size=group_size, symmetric=symmetric,
                               n_grid=n_grid, expand=expand, reduce=reduce)
        s_eff, name, new_w = fold(layer, mapping, s, stored_dtype)
        if name is not None:
            norms[name] = new_w
        # the consumers now read x / s_eff: XᵀX → diag(1/s) XᵀX diag(1/s)
        st.xtx = st.xtx / (s_eff[:, None] * s_eff[None, :])
        if st.abs_sum is not None:
            st.abs_sum = st.abs_sum / s_eff.double()
    return norms
