"""The search shared by the grid types IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS and IQ2_S, vectorized over
all sub-blocks of a row chunk and float32-exact to `ggml-quants.c`.

Per sub-block (32 or 16 weights, in groups of 4 or 8 that each take one grid point):
1. signs come out first: `xval = |x|` and one sign bit per weight (x >= 0 is positive). The
   parity types store 7 of every 8 signs and need an even number of minus signs; when it is odd
   they flip the weight with the least `(w*x)*x`, whose xval becomes negative.
2. a scan over candidate scales in ggml's order: each rounds `0.5*(id*xval - 1)` to levels, and
   every group whose level vector is not a grid point takes the neighbour (see
   `iqgrid_tables.py`) with the least weighted error `Σ (waux*diff)*diff`, waux = sqrt(w). The
   candidate is kept if its least-squares fit beats the best so far (`sumqx² > best*sumq2`).
3. a re-rounding at the kept scale of the groups that were off the grid (all groups for IQ3_S and
   IQ2_XXS), and a last least-squares scale.
The types differ in sub-block and group sizes, candidate lists, the parity rule, the initial
on-grid flags and zero tests; each type module describes itself with a `GridSpec` and packs the
result (grid indices, signs, scales) into its own block layout.

Memory stays bounded: the neighbour search runs on the off-grid groups only, bucketed by list
length (lists are 1..292 long), in slices of at most NEIGHBOUR_BUDGET candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gemmaquant.numerics.ggml.iqgrid_tables import GridTables, grid_tables
from gemmaquant.numerics.ggml.search import div, make_qp_quants, nearest_int, seq_sum, sqrt

NEIGHBOUR_BUDGET = 1 << 19  # candidate grid points scored at once (a few MB of temporaries)
_WIDTHS = (2, 4, 8, 16, 32, 64, 128, 256, 512)  # neighbour-list length buckets


@dataclass(frozen=True)
class GridSpec:
    grid: str  # tables, see iqgrid_tables.SPECS
    sub: int  # weights per sub-block
    steps: tuple[int, float]  # candidates: (2*kMaxQ-1 + is*step) for is in -steps[0]..steps[0]
    parity: bool  # 7 stored sign bits per 8 weights, the 8th implied (an even number of minus signs)
    on_grid_init: bool  # ggml's is_on_grid[] before the scan (IQ3_S: false)
    requant_all: bool  # the final re-rounding touches every group, not only the off-grid ones
    eps: float | None  # a sub-block is zero when max(xval) < eps (None: when it is exactly 0)
    qp_start: bool = False  # IQ2_XXS: start from make_qp_quants and scan relative to 3*scale


@dataclass
class GridResult:
    scale: torch.Tensor  # [M] float32 >= 0 per sub-block
    index: torch.Tensor  # [groups per sub-block, M] int64 grid indices (0 in zero sub-blocks)
    signs: torch.Tensor  # [sign bytes per sub-block, M] int64 (7 or 8 bits; 0 in zero sub-blocks)
    zero: torch.Tensor  # [M] bool: the sub-block was skipped as zero


def best_neighbours(
    t: GridTables, keys: torch.Tensor, xg: torch.Tensor, wg: torch.Tensor, scale: torch.Tensor,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """iq{2,3}_find_best_neighbour (and IQ1's iq1_find_best_neighbour2) for n off-grid groups:
    keys [n], xg/wg [n, G] (values, weights), scale [n] -> grid index [n] of the first neighbour
    with the least Σ (w*diff)*diff, diff = scale*v[level] - x, summed in coordinate order. v is the
    odd coordinate 2*level + 1, or per group `values` [n, kmax] (IQ1's shifted levels).

    A coordinate's term depends only on its level (3 or 8 of them), so the terms are computed once
    per group and level, `[n, G, kmax]`, and each neighbour's error is a gather of G of them and a
    sequential sum: the same float32 operations as ggml's loop, done once instead of per neighbour."""
    out = torch.empty_like(keys)
    count = t.count[keys]
    v = t.odd[None, None, :] if values is None else values[:, None, :]
    diff = scale[:, None, None] * v - xg[:, :, None]  # (scale*q) - x
    terms = ((wg[:, :, None] * diff) * diff).view(len(keys), -1)  # [n, G*kmax]
    lo = 0
    for hi in _WIDTHS:
        sel = ((count > lo) & (count <= hi)).nonzero().squeeze(1)
        lo = hi
        if sel.numel() == 0:
            continue
        width = int(count[sel].max())
        j = torch.arange(width, device=keys.device)
        step = max(1, NEIGHBOUR_BUDGET // (width * t.group))
        for c in range(0, sel.numel(), step):
            s = sel[c : c + step]
            valid = j[None, :] < count[s][:, None]
            first = t.start[keys[s]][:, None]
            rows = torch.where(valid, first + j[None, :], first)  # [m, width] entries of `flat`
            code = t.flat_code.index_select(0, rows.view(-1)).view(len(s), -1)  # [m, width*G]
            v = terms[s].gather(1, code).view(len(s), width, t.group)
            d2 = v[:, :, 0] + 0.0  # ggml: d2 = 0; d2 += term_i, in coordinate order
            for i in range(1, t.group):
                d2 += v[:, :, i]
            d2.masked_fill_(~valid, float("inf"))
            out[s] = t.flat[rows.gather(1, d2.argmin(dim=1, keepdim=True)).squeeze(1)]  # first minimum
    return out


class _Groups:
    """The sub-blocks of a chunk as [B, M] (row = position in the sub-block) and as groups."""

    def __init__(self, t: GridTables, xv: torch.Tensor, w: torch.Tensor):
        self.t, self.xv, self.w = t, xv, w
        self.B, self.M = xv.shape
        self.G = t.group
        self.ng = self.B // self.G
        self.wx = w * xv
        # per group, its G values and sqrt weights: [ng*M, G] (group k of sub-block m at k*M + m)
        self.xg = xv.view(self.ng, self.G, self.M).permute(0, 2, 1).reshape(-1, self.G).contiguous()
        self.wg = sqrt(w).view(self.ng, self.G, self.M).permute(0, 2, 1).reshape(-1, self.G).contiguous()
        self.posT = t.pos.T.contiguous()  # [G, grid]
        self.powers = torch.tensor([float(1 << (t.bits * i)) for i in range(self.G)], device=xv.device)

    def round(self, iscale: torch.Tensor, scale: torch.Tensor, which: torch.Tensor | None = None):
        """Levels at `iscale` [M], snapped onto the grid: (grid index [ng, M], on-grid [ng, M]).
        Off-grid groups (only those in `which`, if given) take their best neighbour at `scale`."""
        l = nearest_int((self.xv * iscale).sub_(1.0).mul_(0.5)).clamp_(0, self.t.kmax - 1).float()
        key = (l.view(self.ng, self.G, self.M) * self.powers[None, :, None]).sum(dim=1).long()  # exact: < 2^16
        index = self.t.kmap[key]
        on = index >= 0
        off = ~on if which is None else (~on & which)
        flat_off = off.reshape(-1).nonzero().squeeze(1)
        if flat_off.numel():
            found = best_neighbours(self.t, key.reshape(-1)[flat_off], self.xg[flat_off], self.wg[flat_off],
                                    scale.repeat(self.ng)[flat_off])  # fmt: skip
            index.view(-1)[flat_off] = found
        return index, on

    def sums(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sumqx = Σ (w*xval)*q and sumq2 = Σ (w*q)*q over each sub-block, q = 2*level + 1."""
        q = self.posT.index_select(1, index.view(-1)).view(self.G, self.ng, self.M).transpose(0, 1).reshape(self.B, self.M)
        return seq_sum(torch.stack([self.wx * q, (self.w * q) * q]))


def _signs(x: torch.Tensor, w: torch.Tensor, parity: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x, w [n, 8] -> (xval [n, 8], sign byte [n] int64) for every 8 consecutive weights."""
    neg = ~(x >= 0)
    xval = torch.where(neg, -x, x)
    bit = torch.tensor([1 << i for i in range(8)], device=x.device)
    s = (neg.long() * bit).sum(dim=1)
    if parity:
        odd = (neg.sum(dim=1) % 2) == 1
        imin = ((w * x) * x).argmin(dim=1)  # first minimum, as ggml's strict `<` scan
        flip = torch.zeros_like(neg).scatter_(1, imin[:, None], True) & odd[:, None]
        xval = torch.where(flip, -xval, xval)
        s = torch.where(odd, s ^ bit[imin], s) & 127
    return xval, s


def grid_search(x: torch.Tensor, w: torch.Tensor, spec: GridSpec) -> GridResult:
    """x, w [nb, 256] (weights as the type defines them) -> the sub-blocks' scales, grid indices
    and signs, exactly as ggml's quantize_row_iq*_impl leaves them before the super-block scale."""
    t = grid_tables(spec.grid, x.device)
    B = spec.sub
    xval, signs = _signs(x.reshape(-1, 8), w.reshape(-1, 8), spec.parity)
    xv = xval.view(-1, B).T.contiguous()  # [B, M]
    wv = w.reshape(-1, B).T.contiguous()
    signs = signs.view(-1, B // 8).T.contiguous()  # [B/8, M]
    g = _Groups(t, xv, wv)
    mx = xv.amax(dim=0)
    zero = (mx == 0) if spec.eps is None else (mx < spec.eps)
    kmax1 = float(2 * t.kmax - 1)

    if spec.qp_start:
        scale, _ = make_qp_quants(xv, wv, t.kmax + 1)
        ref = scale * float(t.kmax)  # eff_max
        zero = zero | ~(ref > 0)
    else:
        ref = mx
        scale = div(mx, kmax1)
    ref = torch.where(zero, 1.0, ref)  # (zero sub-blocks are masked at the end; keep them finite)
    best = torch.zeros_like(scale)
    index = torch.zeros((g.ng, g.M), dtype=torch.int64, device=x.device)  # kmap[0] == 0: L = 0
    on = torch.full((g.ng, g.M), spec.on_grid_init, device=x.device)
    n, step = spec.steps
    for k in range(-n, n + 1):
        c = float(np.float32(kmax1) + np.float32(k) * np.float32(step))
        iscale = div(c, ref)
        idx, on_k = g.round(iscale, div(1.0, iscale))
        sumqx, sumq2 = g.sums(idx)
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = torch.where(take, div(sumqx, sumq2), scale)
        best = torch.where(take, scale * sumqx, best)
        index = torch.where(take[None], idx, index)
        on = torch.where(take[None], on_k, on)

    need = ~zero & (scale > 0)
    if not spec.qp_start:
        need &= (~on).any(dim=0)
    if bool(need.any()):
        regroup = need[None].expand_as(on) if spec.requant_all else (need[None] & ~on)
        safe = torch.where(need, scale, 1.0)
        idx, _ = g.round(div(1.0, safe), safe, which=regroup)
        index = torch.where(regroup, idx, index)
        sumqx, sumq2 = g.sums(index)
        scale = torch.where(need & (sumq2 > 0), div(sumqx, sumq2), scale)

    negative = scale < 0
    scale = torch.where(negative, -scale, scale)
    signs = torch.where(negative[None], ~signs & (127 if spec.parity else 255), signs)
    return GridResult(
        scale=torch.where(zero, 0.0, scale),
        index=torch.where(zero[None], 0, index),
        signs=torch.where(zero[None], 0, signs),
        zero=zero,
    )


def sub_scales(scale: torch.Tensor, nb: int, fudge: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The super-block scale and the 4-bit sub-scales: scale [M] (nb*S, block-major) ->
    (d16 [nb] float16 = fp16(d*fudge) with d = max/31, l [nb, S] int64 in 0..15, live [nb])."""
    s = scale.view(nb, -1)
    max_scale = s.amax(dim=1)
    live = max_scale > 0
    d = div(torch.where(live, max_scale, 1.0), 31.0)
    iscale = div(1.0, d)
    l = (s * iscale[:, None]).sub_(1.0).mul_(0.5)
    l = torch.where(live[:, None], nearest_int(l).clamp_(0, 15), 0).long()
    dd = d if fudge is None else d * float(np.float32(fudge))
    return torch.where(live, dd, 0.0).to(torch.float16), l, live
