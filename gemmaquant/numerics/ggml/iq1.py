"""IQ1_S and IQ1_M: 8 weights per point of a 2048-point ternary grid, shifted by ±1/8.

Values are `dl*(g + delta)`, g in {-1, 0, 1}^8 from the grid and delta = ±0.125 per 32 weights
(IQ1_S) or per 8 (IQ1_M). Quantizers are byte-identical to `ggml_quantize_chunk`
(`quantize_row_iq1_{s,m}_impl`; IQ1_S needs an importance matrix, IQ1_M runs without one on x²
weights) and take the blocks of a row chunk, `x [nb, 256]` float32, with the importance weights
tiled to the same shape (`qw`).

Per sub-block (32 weights for IQ1_S, 16 for IQ1_M) ggml solves the 3-level split exactly: the
weights sorted ascending (a stable sort, as glibc's qsort is for arrays this small) are cut at
i1 <= i2 into levels 0/1/2, and every cut and shift is scored in order from prefix sums, keeping
the best weighted least-squares fit (a sequential scan of 1122 / 612 candidates, vectorized over
sub-blocks). Groups whose levels are not a grid point take their best neighbour (shared tables
with IQ1_S, `iqgrid_tables.py`), scored on the signed x with the plain weights; then the scale is
refitted. IQ1_M finally refits the super-block scale over all its sub-blocks.

Dequantizers `(b [nb, bytes] uint8, out [nb, 256] float32)` write gguf-py's `dl*(grid + delta)`.
"""

from __future__ import annotations

import numpy as np
import torch

from gemmaquant.numerics.ggml.iqgrid import best_neighbours
from gemmaquant.numerics.ggml.iqgrid_tables import grid_tables
from gemmaquant.numerics.ggml.fields import f16, fp16_bytes
from gemmaquant.numerics.ggml.search import div, f32, nearest_int, seq_sum, sqrt
from gemmaquant.numerics.ggml.family import GGMLKernels, per_block
from gemmaquant.numerics.ggml.types import QK_K, GGMLType

DELTA = 0.125  # IQ1S_DELTA = IQ1M_DELTA
X_P = (-1 + DELTA, DELTA, 1 + DELTA)  # levels with a positive shift (exact in float32)
X_M = (-1 - DELTA, -DELTA, 1 - DELTA)


def _weights(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """qw*sqrt(sigma2 + x²) with sigma2 = 2Σx²/256 per block, or x² without an imatrix."""
    if qw is None:
        return x * x
    xt = x.T.contiguous()
    sigma2 = div(2.0 * seq_sum(xt * xt), 256.0)
    return qw * sqrt(sigma2[:, None] + x * x)


def _prefix(v: torch.Tensor) -> torch.Tensor:
    """[B, M] -> [B+1, M]: 0, v0, v0+v1, ... added in order (torch.cumsum accumulates in double)."""
    out = v.new_zeros((v.shape[0] + 1, v.shape[1]))
    for j in range(v.shape[0]):
        torch.add(out[j], v[j], out=out[j + 1])
    return out


class _Scan:
    """ggml's running best over candidates in order: keep a candidate when sumq2 > 0 and
    sumqx² > best*sumq2, then best = (sumqx/sumq2)*sumqx. Vectorized over sub-blocks [M]."""

    def __init__(self, m: int, device: torch.device):
        self.best = torch.full((m,), -float(np.finfo(np.float32).max), device=device)
        self.scale = torch.zeros(m, device=device)
        self.choice = torch.full((m,), -1, dtype=torch.int64, device=device)
        self._t = torch.empty(m, device=device)
        self._take = torch.empty(m, dtype=torch.bool, device=device)

    def feed(self, sumqx: torch.Tensor, sumq2: torch.Tensor, first: int) -> None:
        """Candidates `first`, `first`+1, ... as rows of [C, M] tensors, in order."""
        qx2 = torch.where(sumq2 > 0, sumqx * sumqx, float("nan"))  # NaN: never taken
        ratio = div(sumqx, sumq2)
        score = ratio * sumqx
        for c in range(sumqx.shape[0]):
            torch.mul(self.best, sumq2[c], out=self._t)
            torch.gt(qx2[c], self._t, out=self._take)
            torch.where(self._take, score[c], self.best, out=self.best)
            torch.where(self._take, ratio[c], self.scale, out=self.scale)
            self.choice.masked_fill_(self._take, first + c)


def _split_levels(order: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor) -> torch.Tensor:
    """Levels of a split: sorted position j gets 0 below i1, 1 below i2, else 2; [B, M] int64 in
    the original order."""
    j = torch.arange(order.shape[0], device=order.device)[:, None]
    sorted_levels = (j >= i1[None]).long() + (j >= i2[None]).long()
    return torch.empty_like(sorted_levels).scatter_(0, order, sorted_levels)


def _snap(x: torch.Tensor, w: torch.Tensor, L: torch.Tensor, scale: torch.Tensor, shift_p: torch.Tensor):
    """Levels [B, M] -> grid indices [B/8, M]; off-grid groups take iq1_find_best_neighbour2's
    choice at `scale` with their group's levels (shift_p [B/8, M]: X_P, else X_M). Also returns
    whether any group of a sub-block was off the grid [M]."""
    t = grid_tables("IQ1_S", x.device)
    B, M = L.shape
    ng = B // 8
    key = (L.view(ng, 8, M) << (2 * torch.arange(8, device=x.device))[None, :, None]).sum(dim=1)  # [ng, M]
    index = t.kmap[key]
    off = index < 0
    flat = off.reshape(-1).nonzero().squeeze(1)
    if flat.numel():
        xg = x.view(ng, 8, M).permute(0, 2, 1).reshape(-1, 8)[flat]
        wg = w.view(ng, 8, M).permute(0, 2, 1).reshape(-1, 8)[flat]
        vp = torch.tensor(X_P, device=x.device)
        vm = torch.tensor(X_M, device=x.device)
        values = torch.where(shift_p.reshape(-1)[flat, None], vp, vm)
        index.view(-1)[flat] = best_neighbours(t, key.reshape(-1)[flat], xg, wg, scale.repeat(ng)[flat], values)
    return index, off.any(dim=0)


def _level_values(index: torch.Tensor, shift_p: torch.Tensor, B: int) -> torch.Tensor:
    """q = xx[level] per weight: index [B/8, M], shift_p [B/8, M] -> [B, M]."""
    t = grid_tables("IQ1_S", index.device)
    lev = (t.pos[index] - 1.0) * 0.5  # [ng, M, 8] levels 0..2 (exact)
    vp = torch.tensor(X_P, device=index.device)[lev.long()]
    vm = torch.tensor(X_M, device=index.device)[lev.long()]
    q = torch.where(shift_p[:, :, None], vp, vm)
    return q.permute(0, 2, 1).reshape(B, -1)


def _refit(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """if (sumqx > 0 && sumq2 > 0) scale = sumqx/sumq2, with sumqx = Σ (w*q)*x over the sub-block."""
    wq = w * q
    sumqx, sumq2 = seq_sum(torch.stack([wq * x, wq * q]))
    return torch.where(where & (sumqx > 0) & (sumq2 > 0), div(sumqx, sumq2), scale)


def _sorted_sums(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort(x, dim=0, stable=True).indices  # ties keep index order (glibc's merge sort)
    return order, (w * x).gather(0, order)


def quantize_iq1_s(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """[nb, 256] -> [nb, 50]: d, qs[32] (low 8 bits of the 11-bit indices), qh u16[8] (3 high index
    bits per group at 3k, 3-bit scale << 12, bit 15 = negative shift)."""
    nb = x.shape[0]
    B = 32
    w = _weights(x, qw)
    xs, ws = x.reshape(-1, B).T.contiguous(), w.reshape(-1, B).T.contiguous()  # [32, M]
    M = xs.shape[1]
    zero = xs.abs().amax(dim=0) < f32(1e-12)
    order, wx_sorted = _sorted_sums(xs, ws)
    sumx = _prefix(wx_sorted)
    sumw = _prefix(ws.gather(0, order))
    scan = _Scan(M, x.device)
    cand = 0
    for i1 in range(B + 1):
        a, aw = sumx[i1] - sumx[0], sumw[i1] - sumw[0]
        b, bw = sumx[i1:] - sumx[i1], sumw[i1:] - sumw[i1]  # i2 = i1..32
        c, cw = sumx[B] - sumx[i1:], sumw[B] - sumw[i1:]
        qx, q2 = [], []
        for v in (X_P, X_M):
            qx.append(((a * v[0]) + (b * v[1])) + (c * v[2]))
            q2.append((((aw * v[0]) * v[0]) + ((bw * v[1]) * v[1])) + ((cw * v[2]) * v[2]))
        # candidate order: for each i2, x_p then x_m
        scan.feed(torch.stack(qx, dim=1).reshape(-1, M), torch.stack(q2, dim=1).reshape(-1, M), cand)
        cand += 2 * (B + 1 - i1)
    found = (scan.choice >= 0) & ~zero
    i1s, i2s, shift_p = _decode_iq1_s(scan.choice.clamp(min=0), B)
    L = _split_levels(order, i1s, i2s)
    scale = scan.scale
    neg = scale < 0
    L = torch.where(neg[None], 2 - L, L)
    scale = torch.where(neg, -scale, scale)
    shift_p = shift_p ^ neg
    scale = torch.where(found, scale, 1.0)  # (keeps the neighbour search finite where unused)
    sp = shift_p[None].expand(B // 8, M)
    index, any_off = _snap(xs, ws, L, scale, sp)
    scale = _refit(xs, ws, _level_values(index, sp, B), scale, any_off)
    scale = torch.where(found, scale, 0.0)
    index = torch.where(found[None], index, 0)
    shift_neg = found & ~shift_p

    s = scale.view(nb, 8)
    max_scale = s.amax(dim=1)
    live = max_scale > 0
    d = div(torch.where(live, max_scale, 1.0), 15.0)
    l = nearest_int((s * div(1.0, d)[:, None]).sub_(1.0).mul_(0.5)).clamp_(0, 7).long()
    l = torch.where(live[:, None], l | (shift_neg.view(nb, 8).long() << 3), 0)
    idx = index.T.reshape(nb, 8, 4)  # [block, sub-block, group]
    qh = ((idx >> 8) << torch.tensor([0, 3, 6, 9], device=x.device)).sum(dim=2) | (l << 12)
    d16 = torch.where(live, d * f32(1.125), 0.0)
    body = torch.cat([(idx & 0xFF).reshape(nb, 32), torch.stack([qh & 0xFF, qh >> 8], dim=2).reshape(nb, 16)], dim=1)
    return torch.cat([fp16_bytes(d16), body.to(torch.uint8)], dim=1)


def _decode_iq1_s(choice: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate number -> (i1, i2, positive shift): candidates run over i1, then i2 >= i1, then
    the shift (+ before -)."""
    starts = torch.tensor([sum(2 * (B + 1 - k) for k in range(i)) for i in range(B + 2)], device=choice.device)
    i1 = torch.searchsorted(starts, choice, right=True) - 1
    r = choice - starts[i1]
    return i1, i1 + r // 2, (r % 2) == 0


def quantize_iq1_m(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """[nb, 256] -> [nb, 56]: qs[32] (low 8 bits of the indices), qh[16] (per 16 weights: high
    index bits of group 0 at 0-2 and of group 1 at 4-6, negative shifts at 0x08 / 0x80), scales
    u16[4] (3-bit scales at 3*(ib%4), the fp16 super-scale in the top nibbles)."""
    nb = x.shape[0]
    B = 16
    w = _weights(x, qw)
    xs, ws = x.reshape(-1, B).T.contiguous(), w.reshape(-1, B).T.contiguous()  # [16, M]
    M = xs.shape[1]
    zero = xs.abs().amax(dim=0) < f32(1e-7)
    order, wx_sorted = _sorted_sums(xs, ws)
    w_sorted = ws.gather(0, order)
    second = order >= B // 2  # the sorted weight belongs to the second half (its own shift)
    # prefix sums per half: the other half's running sum is carried unchanged (adding +0.0 to a
    # sum that is never -0.0 changes nothing)
    px = [_prefix(torch.where(second, 0.0, wx_sorted)), _prefix(torch.where(second, wx_sorted, 0.0))]
    pw = [_prefix(torch.where(second, 0.0, w_sorted)), _prefix(torch.where(second, w_sorted, 0.0))]
    p2, m2 = X_P[2], X_M[2]
    cp1, cp2 = X_P[0] * X_P[0] - X_P[1] * X_P[1], X_P[1] * X_P[1] - X_P[2] * X_P[2]  # exact: 0.75, -1.25
    cm1, cm2 = X_M[0] * X_M[0] - X_M[1] * X_M[1], X_M[1] * X_M[1] - X_M[2] * X_M[2]  # 1.25, -0.75
    scan = _Scan(M, x.device)
    cand = 0
    for i1 in range(B + 1):
        qx_p, qx_m, q2_p, q2_m = [], [], [], []
        for h in range(2):
            sx = px[h][i1] + px[h][i1:]  # [n2, M], i2 = i1..16
            qx_p.append(px[h][B] * p2 - sx)
            qx_m.append(px[h][B] * m2 - sx)
            q2_p.append(((pw[h][B] * p2) * p2 + pw[h][i1] * cp1) + pw[h][i1:] * cp2)
            q2_m.append(((pw[h][B] * m2) * m2 + pw[h][i1] * cm1) + pw[h][i1:] * cm2)
        qx = torch.stack([qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]], dim=1)
        q2 = torch.stack([q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]], dim=1)
        scan.feed(qx.reshape(-1, M), q2.reshape(-1, M), cand)  # order: for each i2, k = 0..3
        cand += 4 * (B + 1 - i1)
    found = (scan.choice >= 0) & ~zero
    starts = torch.tensor([sum(4 * (B + 1 - k) for k in range(i)) for i in range(B + 2)], device=x.device)
    choice = scan.choice.clamp(min=0)
    i1s = torch.searchsorted(starts, choice, right=True) - 1
    r = choice - starts[i1s]
    L = _split_levels(order, i1s, i1s + r // 4)
    k = r % 4  # 0: (+,+), 1: (+,-), 2: (-,+), 3: (-,-) for the two groups of 8
    scale = scan.scale
    neg = scale < 0
    L = torch.where(neg[None], 2 - L, L)
    scale = torch.where(neg, -scale, scale)
    k = torch.where(neg, 3 - k, k)
    k = torch.where(found, k, 0)
    sp = torch.stack([k < 2, k % 2 == 0])  # [2, M]: group uses X_P
    safe = torch.where(found, scale, 1.0)
    index, any_off = _snap(xs, ws, L, safe, sp)
    scale = _refit(xs, ws, _level_values(index, sp, B), safe, any_off)
    scale = torch.where(found, scale, 0.0)
    index = torch.where(found[None], index, 0)

    s = scale.view(nb, 16)
    max_scale = s.amax(dim=1)
    live = max_scale > 0
    d = div(torch.where(live, max_scale, 1.0), 15.0)
    l = nearest_int((s * div(1.0, d)[:, None]).sub_(1.0).mul_(0.5)).clamp_(0, 7).long()  # [nb, 16]
    masks = torch.tensor([0x00, 0x80, 0x08, 0x88], device=x.device)[k].view(nb, 16)
    idx = index.T.reshape(nb, 16, 2)
    qh = (idx[:, :, 0] >> 8) | ((idx[:, :, 1] >> 8) << 4) | torch.where(live[:, None], masks, 0)
    # the super-scale: a least-squares refit over all 256 weights at the stored codes and scales
    q = _level_values(index, sp, B) * (2 * l.reshape(-1) + 1).float()[None]  # [16, M]
    q256 = q.T.reshape(nb, 256).T.contiguous()
    x256, w256 = x.T.contiguous(), w.T.contiguous()
    wq = w256 * q256
    sumqx, sumq2 = seq_sum(torch.stack([wq * x256, wq * q256]))
    d = torch.where(sumq2 > 0, div(sumqx, sumq2), d)
    u = (d * f32(1.1125)).to(torch.float16).view(torch.int16).long() & 0xFFFF
    sc = (l.view(nb, 4, 4) << torch.tensor([0, 3, 6, 9], device=x.device)).sum(dim=2)  # [nb, 4]
    sc = sc | torch.stack([(u & 0xF) << 12, (u & 0xF0) << 8, (u & 0xF00) << 4, u & 0xF000], dim=1)
    sc = torch.where(live[:, None], sc, 0)
    body = [(idx & 0xFF).reshape(nb, 32), qh, torch.stack([sc & 0xFF, sc >> 8], dim=2).reshape(nb, 8)]
    return torch.cat(body, dim=1).to(torch.uint8)


def _grid_points(b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return grid_tables("IQ1_S", b.device).values[index.long()]  # [..., 8] of -1, 0, 1


def dequantize_iq1_s(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    d = f16(b, 0)  # [nb, 1]
    qh = b[:, 34:50].contiguous().view(torch.int16).long() & 0xFFFF  # [nb, 8]
    dl = d * (2 * ((qh >> 12) & 7) + 1).float()  # gguf: d * (2*((qh >> 12) & 7) + 1)
    delta = torch.where((qh & 0x8000) == 0, DELTA, -DELTA)
    high = torch.stack([(qh >> s) & 7 for s in (0, 3, 6, 9)], dim=2)  # [nb, 8, 4]
    g = _grid_points(b, b[:, 2:34].long().view(nb, 8, 4) | (high << 8))  # [nb, 8, 4, 8]
    out.view(nb, 8, 4, 8).copy_(dl[:, :, None, None] * (g + delta[:, :, None, None]))


def dequantize_iq1_m(b: torch.Tensor, out: torch.Tensor) -> None:
    nb = b.shape[0]
    sc = b[:, 48:56].contiguous().view(torch.int16).long() & 0xFFFF  # [nb, 4]
    u = ((sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000))
    d = u.to(torch.int16).view(torch.float16).float()[:, None]  # [nb, 1]
    s3 = torch.stack([(sc >> s) & 7 for s in (0, 3, 6, 9)], dim=2).reshape(nb, 16)
    dl = d * (2 * s3 + 1).float()  # [nb, 16]
    qh = b[:, 32:48].long()  # [nb, 16]
    halves = torch.stack([qh, qh >> 4], dim=2)  # [nb, 16, 2]
    delta = torch.where((halves & 0x08) == 0, DELTA, -DELTA)
    g = _grid_points(b, b[:, 0:32].long().view(nb, 16, 2) | ((halves & 7) << 8))  # [nb, 16, 2, 8]
    out.view(nb, 16, 2, 8).copy_(dl[:, :, None, None] * (g + delta[:, :, :, None]))


TYPES = {
    GGMLType.IQ1_S: GGMLKernels(per_block(quantize_iq1_s, QK_K), dequantize_iq1_s, needs_imatrix=True),
    GGMLType.IQ1_M: GGMLKernels(per_block(quantize_iq1_m, QK_K), dequantize_iq1_m),
}
