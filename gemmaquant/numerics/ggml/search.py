"""The scale searches of `ggml/src/ggml-quants.c`, vectorized over sub-blocks, bit-exact in float32.

Layout: a group of sub-blocks is a `[P, M]` float32 tensor, P = weights per sub-block (8, 16 or
32) and M = number of sub-blocks; row `x[i]` holds weight i of every sub-block. Per-sub-block
state is `[M]`. Reductions add the P rows strictly left to right (`seq_sum`), because ggml sums
that way starting at 0.0f and `sum()`/matmul would reorder and flip rare decisions. Candidate
loops keep ggml's order and update per-sub-block state with `torch.where`.

Speed (CPU): a torch op costs ~5 us of dispatch and a float32 pass over a 1 MB tensor ~80 us,
so the searches work in place on buffers allocated once per call, keep the accepted candidate's
parameters rather than its codes (a [P, M] `where` per step is the slowest pass) and rebuild the
codes once at the end.

Numerics traps handled here (each flips real blocks if ignored):
* ggml evaluates `a*b*c` as `(a*b)*c` with no FMA (libggml-base is built for baseline x86-64).
* Divisions stay divisions. `const / tensor` in torch is `reciprocal(t) * const`, and on CUDA
  `tensor / python_scalar` multiplies by the reciprocal, so both go through `div()` below.
* torch's float32 CPU `sqrt` is not correctly rounded: `sqrt()` below goes through double.
* `nearest_int` is emulated bit for bit (add 1.5*2^23, read the mantissa), not with round().
* `uint8_t` stores wrap (`& 0xFF`) before any MIN/compare that follows them in C.
"""

from __future__ import annotations

from contextvars import ContextVar

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))

# torch.compile'd (or native C, `native.py`) versions of the searches below by function name, set for
# the quantizer that runs in this thread by `compiled_quantize.py` (None: the plain searches). Each is this module's own
# function traced whole; inside the trace `torch.compiler.is_dynamo_compiling()` picks the branches that
# have no data-dependent control flow. (Not `is_compiling()`: that is a process-wide flag, True in
# every thread while one thread's graph is being traced by AOTAutograd, and would send another
# thread's plain search into the compiled-only branches: reordered eager sums, wrong bytes.)
COMPILED: ContextVar[dict | None] = ContextVar("gemmaquant_compiled_searches", default=None)


def _compiled(name: str, x: torch.Tensor, *more: torch.Tensor | None):
    """The compiled search `name` for a [P, M] input (and the [P, M] tensors `more`), or None (plain
    path; M < 2 too: dynamo would specialize a size-1 dimension into a graph of its own). A table
    whose `traced` attribute is False (the native C searches) gets its tensors as they are."""
    if torch.compiler.is_dynamo_compiling():  # (first: dynamo cannot trace ContextVar.get)
        return None
    table = COMPILED.get()
    if table is None or x.shape[-1] < 2:
        return None
    fn = table.get(name)
    if fn is not None and getattr(table, "traced", True):
        for t in (x, *more):  # one graph for every number of sub-blocks
            if t is not None:
                torch._dynamo.mark_dynamic(t, t.dim() - 1)
    return fn


def f32(value: float) -> float:
    """A C float literal: the Python float holding exactly float32(value)."""
    return float(np.float32(value))


def div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """True float32 division a / b, with Python-scalar operands turned into device tensors."""
    ref = a if isinstance(a, torch.Tensor) else b
    if torch.compiler.is_dynamo_compiling():  # inductor keeps CPU divisions by constants as divisions
        return torch.div(a if isinstance(a, torch.Tensor) else torch.full_like(ref, a), b)
    if not isinstance(a, torch.Tensor):
        a = _scalar(a, ref.device)
    if not isinstance(b, torch.Tensor):
        b = _scalar(b, ref.device)
    return torch.div(a, b)


_SCALARS: dict[tuple[float, str], torch.Tensor] = {}


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A cached 0-d float32 tensor (torch.tensor() costs ~20 us a call; the searches make ~10^4)."""
    key = (float(value), str(device))
    if key not in _SCALARS:
        _SCALARS[key] = torch.tensor(value, dtype=torch.float32, device=device)
    return _SCALARS[key]


def sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrtf. torch's float32 CPU sqrt is not (~17% of values are 1 ulp
    off); a double sqrt rounded to float is exact (53 >= 2*24 + 2 bits, so no double rounding)."""
    return torch.sqrt(v.double()).float()


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even for |v| < 2^22 (and its exact bits beyond). int32."""
    bits = (v + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def seq_sum(terms: torch.Tensor, start_at_zero: bool = True) -> torch.Tensor:
    """Left-to-right float32 sum over dim -2 of [..., P, M]. `0.0f + t0` turns a leading -0.0
    into +0.0; with start_at_zero=False the sum starts from t0 itself (`float s = t[0];`).

    One op: `index_add_` with an all-zero index adds the P rows into one accumulator strictly in
    index order (ATen's CPU kernel loops over the index, one vectorized `acc += row` each; alpha 1
    keeps `acc + 1*row` exact even as an FMA), so this is ggml's order without P-1 launches."""
    p = terms.shape[-2]
    if torch.compiler.is_dynamo_compiling():
        return _compiled_seq_sum(terms, start_at_zero)
    if terms.is_cuda:  # CUDA's index_add_ uses atomics (any order): add row by row
        acc = terms[..., 0, :] + 0.0 if start_at_zero else terms[..., 0, :].clone()
        for i in range(1, p):
            acc += terms[..., i, :]
        return acc
    if start_at_zero:
        acc = terms.new_zeros(terms.shape[:-2] + (1, terms.shape[-1]))
        return acc.index_add_(-2, _zeros_index(p, terms.device), terms).squeeze(-2)
    acc = terms[..., :1, :].clone()
    return acc.index_add_(-2, _zeros_index(p - 1, terms.device), terms[..., 1:, :]).squeeze(-2)


def _compiled_seq_sum(terms: torch.Tensor, start_at_zero: bool) -> torch.Tensor:
    """seq_sum inside torch.compile (CPU): inductor lowers a sum over the outer dim -2 to a loop over
    the P rows, vectorized across M, each lane adding `acc = acc + row` from acc = 0 in row order,
    which is ggml's loop (no reassociation or FMA contraction: inductor compiles with
    -fno-unsafe-math-optimizations -ffp-contract=off, pinned in `compiled_quantize.py`). In eager
    mode sum() would reorder; the compiled quantizers' first call is checked against the plain ones.
    Starting from t0 instead of 0 differs only when every term is -0.0: then C's sum is -0.0."""
    s = terms.sum(-2)
    if start_at_zero:
        return s
    # -0.0 is the only float whose bits are INT32_MIN, so the rows are all -0.0 exactly when the
    # largest int32 view is INT32_MIN: one vectorized max (signbit().all() lowers to a scalar loop
    # per element, 30x the cost of the sum itself).
    all_neg_zero = terms.view(torch.int32).amax(-2) == -(2**31)
    return torch.where(all_neg_zero, -0.0, s)


_ZERO_INDEX: dict[tuple[int, str], torch.Tensor] = {}


def _zeros_index(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _ZERO_INDEX:
        _ZERO_INDEX[key] = torch.zeros(n, dtype=torch.int64, device=device)
    return _ZERO_INDEX[key]


def first_abs_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`if (|x_i| > amax) {amax = |x_i|; max = x_i;}` from amax = max = 0: (amax, signed max)."""
    amax = torch.zeros_like(x[0])
    mx = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        ax = x[i].abs()
        take = ax > amax
        amax = torch.where(take, ax, amax)
        mx = torch.where(take, x[i], mx)
    return amax, mx


def running_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`min = max = x[0]; if (x_i < min) min = x_i; if (x_i > max) max = x_i;` (keeps ±0 as C)."""
    mn, mx = x[0].clone(), x[0].clone()
    for i in range(1, x.shape[0]):
        mn = torch.where(x[i] < mn, x[i], mn)
        mx = torch.where(x[i] > mx, x[i], mx)
    return mn, mx


def qx_grid(nmax: int) -> list[float]:
    """make_qx_quants' candidate iscale numerators: -nmax, then -(nmax + 0.1*is) for is = -9..9
    except 0, each a float32 C expression."""
    steps = [s for s in range(-9, 10) if s != 0]
    return [float(-nmax)] + [float(-(np.float32(nmax) + np.float32(0.1) * np.float32(s))) for s in steps]


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw): symmetric scale search.

    x, qw: [P, M]. Returns (scale [M], L [P, M] int32 in 0..2*nmax-1). The scale is negative when
    the largest-|x| weight is positive, so that weight maps to code 0 (= -nmax).

    Each candidate is 6 in-place passes over [P, M] buffers allocated once and one `seq_sum` for
    both sums. The codes are a pure function of the candidate's iscale, so the scan keeps the
    accepted iscale per sub-block and rebuilds L once. (Evaluating all 19 candidates as one
    [S, P, M] batch was slower: the same traffic, out of cache.)
    """
    if (fn := _compiled("make_qx_quants", x, qw)) is not None:
        return fn(x, nmax, qw)
    amax, mx = first_abs_max(x)
    w = qw if qw is not None else x * x
    wx = w * x
    l, terms = torch.empty_like(x), x.new_empty((2,) + tuple(x.shape))

    # |iscale * x| <= nmax + 1 because |x| <= |mx|, so round() equals nearest_int here; codes
    # stay float32 (-nmax..nmax-1) until the end.
    def candidate(c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        iscale = div(c, mx)
        if torch.compiler.is_dynamo_compiling():  # functional: inductor fuses the codes into both sums
            lc = torch.round(x * iscale).clamp(-nmax, nmax - 1)
            return iscale, seq_sum(wx * lc), seq_sum((w * lc) * lc)
        torch.mul(x, iscale, out=l).round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx, l, out=terms[0])  # (w*x)*l
        torch.mul(w, l, out=terms[1]).mul_(l)  # (w*l)*l
        sumlx, suml2 = seq_sum(terms)
        return iscale, sumlx, suml2

    grid = qx_grid(nmax)
    sel, sumlx, suml2 = candidate(grid[0])
    scale = torch.where(suml2 != 0, div(sumlx, suml2), 0.0)
    best = scale * sumlx
    for c in grid[1:]:
        iscale, sumlx, suml2 = candidate(c)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(take, div(sumlx, suml2), scale)
        best = torch.where(take, scale * sumlx, best)
        sel = torch.where(take, iscale, sel)
    L = torch.mul(x, sel, out=l).round_().clamp_(-nmax, nmax - 1)
    zero = amax < GROUP_MAX_EPS  # (also masks the inf/NaN grids of those sub-blocks)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, L.to(torch.int32) + nmax)


def _grid_codes(
    out: torch.Tensor, x: torch.Tensor, iscale: torch.Tensor, cur_min: torch.Tensor, mn: torch.Tensor,
    mx: torch.Tensor, nmax: int,
) -> torch.Tensor:
    """out = clamp(nearest_int(iscale * (x - cur_min)), 0, nmax) as float32 codes [P, M].

    round() equals nearest_int only below 2^22. The argument is monotone in x, so its extremes are
    at mn and mx; when cur_min > mn and mx - cur_min is tiny they can exceed 2^22 and ggml's
    nearest_int returns mantissa garbage, which we then reproduce exactly (rare: a slow path).
    """
    if torch.compiler.is_dynamo_compiling():  # no data-dependent branch in a graph: always ggml's own rounding
        return nearest_int((x - cur_min) * iscale).clamp_(0, nmax).float()
    v = torch.sub(x, cur_min, out=out).mul_(iscale)
    edge = torch.maximum((iscale * (mn - cur_min)).abs_(), (iscale * (mx - cur_min)).abs_())
    # NaN too (an inf iscale, from a span of subnormals: 0*inf): round() would keep it, C gives a code
    if not bool((edge < 4194304.0).all()):
        return out.copy_(nearest_int(v).clamp_(0, nmax))
    return v.round_().clamp_(0, nmax)


def make_qkx(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, qkx3: bool,
    use_mad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants (qkx3=False) / make_qkx3_quants (qkx3=True).

    `use_mad` (Q2_K's reference path) scores candidates by the weighted absolute error `w*|diff|`
    instead of the weighted squared error `w*diff*diff`.

    Asymmetric search x ≈ scale*L - the_min. x, w: [P, M]. Returns (scale [M], the_min [M], L
    [P, M] int32 in 0..nmax). The grid of candidate k is built around `cur_min`, which starts at
    min(x, 0) and becomes the min of every accepted candidate, so the steps run in order; each
    step is ~12 in-place passes over [P, M] buffers allocated once, and one `seq_sum` for its
    three sums.
    """
    if (fn := _compiled("make_qkx", x, w)) is not None:
        return fn(x, w, nmax, rmin, rdelta, nstep, qkx3, use_mad)
    mn, mx = running_min_max(x)
    wx = w * x
    sum_w = seq_sum(w, start_at_zero=False)
    sum_x = seq_sum(wx, start_at_zero=False)
    mn = torch.where(mn > 0, 0.0, mn)
    degenerate = (mx <= mn) if qkx3 else (mx == mn)

    iscale = div(float(nmax), mx - mn)
    scale = div(1.0, iscale)
    # 0 <= iscale*(x - mn) <= nmax, so round() would do, except where mx - mn is so small (subnormal)
    # that iscale is inf and 0*inf a NaN: C's nearest_int makes that a code, round() a NaN error.
    L = nearest_int(iscale * (x - mn)).clamp_(0, nmax).float()
    diff = (scale * L + mn) - x
    best = seq_sum(w * (diff.abs() if use_mad else diff * diff))
    cur_min = mn
    # L is a pure function of (iscale, grid min): keep the accepted pair per sub-block, not the
    # codes (a where over [P, M] per step costs more than the whole grid), and rebuild L once.
    sel_iscale, sel_min = iscale, mn
    compiling = torch.compiler.is_dynamo_compiling()
    lf, terms = torch.empty_like(x), x.new_empty((3,) + tuple(x.shape))  # terms: w*l, w*l*l, w*l*x
    for step in range(nstep + 1):
        c = (np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax)
        iscale = div(float(c), mx - cur_min)
        if compiling:  # functional: inductor fuses the codes and terms into the sums' loop
            codes = _grid_codes(lf, x, iscale, cur_min, mn, mx, nmax)
            wl = w * codes
            sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * codes), seq_sum(wl * x)
        else:
            codes = _grid_codes(lf, x, iscale, cur_min, mn, mx, nmax)
            wl = torch.mul(w, lf, out=terms[0])
            torch.mul(wl, lf, out=terms[1])
            torch.mul(wl, x, out=terms[2])
            sum_l, sum_l2, sum_xl = seq_sum(terms)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = div(sum_l2 * sum_x - sum_l * sum_xl, D)
        clip = this_min > 0
        this_min = torch.where(clip, 0.0, this_min)
        this_scale = torch.where(clip, div(sum_xl, sum_l2), this_scale)
        if compiling:
            diff = (codes * this_scale + this_min) - x
            err = seq_sum((diff.abs() if use_mad else diff * diff) * w)
        else:
            diff = torch.mul(lf, this_scale, out=terms[0]).add_(this_min).sub_(x)  # (scale*l + min) - x
            err = seq_sum((diff.abs_() if use_mad else diff.mul_(diff)).mul_(w))  # w * |diff| or w * (diff*diff)
        take = (D > 0) & (err < best)
        sel_iscale = torch.where(take, iscale, sel_iscale)
        sel_min = torch.where(take, cur_min, sel_min)
        best = torch.where(take, err, best)
        scale = torch.where(take, this_scale, scale)
        cur_min = torch.where(take, this_min, cur_min)
    L = _grid_codes(lf, x, sel_iscale, sel_min, mn, mx, nmax)
    scale = torch.where(degenerate, 0.0, scale)
    the_min = -torch.where(degenerate, mn, cur_min)
    return scale, the_min, torch.where(degenerate, 0, L.to(torch.int32))


def make_qp_quants(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants(n, nmax, x, L, quant_weights): quantize (mostly) non-negative values.

    x, w: [P, B] (the P scales or mins of each block: 8 for Q4_K/Q5_K, 16 for Q2_K; the 32
    magnitudes of an IQ2_XXS sub-block, one of which may be negative). Returns
    (scale [B], L [P, B] int32 holding the uint8 values ggml stores, i.e. already wrapped to 0..255).
    """
    if (fn := _compiled("make_qp_quants", x, w)) is not None:
        return fn(x, w, nmax)
    mx = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        mx = torch.where(mx > x[i], mx, x[i])  # MAX(max, x[i])
    zero = mx < GROUP_MAX_EPS

    iscale = div(float(nmax), mx)
    L = nearest_int(iscale * x) & 0xFF
    scale = div(1.0, iscale)
    diff = x - scale * L.float()
    best = seq_sum((w * diff) * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        c = np.float32(0.1) * np.float32(step) + np.float32(nmax)
        iscale_k = div(float(c), mx)
        scale_k = div(1.0, iscale_k)
        l = nearest_int(iscale_k * x).clamp_(max=nmax)
        diff = x - scale_k * l.float()
        mse = seq_sum((w * diff) * diff)
        take = mse < best
        best = torch.where(take, mse, best)
        iscale = torch.where(take, iscale_k, iscale)

    l0 = nearest_int(iscale * x).clamp_(max=nmax)
    L = l0 & 0xFF  # the uint8 L[i] the descent reads; the sums use the int (IQ2_XXS passes a
    wx = w * x  # negative x, whose code wraps to 255 in L but counts as -1 in the sums)
    lf = l0.float()
    sumlx = seq_sum(wx * lf)
    suml2 = seq_sum((w * lf) * lf)
    rows = list(L.unbind(0))
    for _ in range(5):
        n_changed = 0
        for i in range(x.shape[0]):
            li = rows[i].float()
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            new_l = nearest_int(div(x[i] * sl2, slx)).clamp_(max=nmax)
            nl = new_l.float()
            slx_new = slx + wx[i] * nl
            sl2_new = sl2 + (w[i] * nl) * nl
            take = (slx > 0) & (sl2 > 0) & (new_l != rows[i])
            take &= (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new
            rows[i] = torch.where(take, new_l & 0xFF, rows[i])
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
            if not torch.compiler.is_dynamo_compiling():  # compiled: all 5 passes (unchanged ones are no-ops)
                n_changed += int(take.any())
        if n_changed == 0 and not torch.compiler.is_dynamo_compiling():  # a pass without change leaves every block as it was: later passes are no-ops
            break
    L = torch.stack(rows)
    scale = torch.where(suml2 > 0, div(sumlx, suml2), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, L)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): Q3_K's reference scale search.

    x: [P, M]. Returns (scale [M], L [P, M] int32 in 0..2*nmax-1). Start from the codes of
    `-nmax/max`, then up to 5 passes of coordinate descent with x² weights: each weight in turn
    moves to the code that best fits the least-squares scale of the others, kept if the fit
    `sumlx²/suml2` improves. The descent is sequential within a sub-block (P dependent steps per
    pass), vectorized across sub-blocks; a pass that changes no sub-block ends it for all (a pass
    without change is a no-op, as in C). An all-zero sub-block returns codes 0, not nmax.
    """
    amax, mx = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    iscale = div(float(-nmax), mx)
    L = nearest_int(iscale * x).clamp_(-nmax, nmax - 1).float()
    w = x * x
    wx = w * x
    sumlx = seq_sum(wx * L)
    suml2 = seq_sum((w * L) * L)
    rows = list(L.unbind(0))
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            li = rows[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            new_l = nearest_int(div(x[i] * sl2, slx)).clamp_(-nmax, nmax - 1).float()
            slx_new = slx + wx[i] * new_l
            sl2_new = sl2 + (w[i] * new_l) * new_l
            take = (slx > 0) & (new_l != li) & (sl2_new > 0)
            take &= (slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new
            rows[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
            changed |= bool(take.any())
        if not changed:
            break
    L = torch.stack(rows).to(torch.int32) + nmax
    scale = torch.where(suml2 > 0, div(sumlx, suml2), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, L)


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf / lroundf (half away from zero), exact: floor(|v|+0.5) is wrong at 0.49999997."""
    a = v.abs()
    fl = torch.floor(a)
    return (fl + torch.floor((a - fl) * 2.0)).copysign_(v)
