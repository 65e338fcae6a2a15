"""Per-tensor GGML types for a size budget: the least total estimated damage whose bytes fit.

    minimise Σ_t D_t(type_t)   subject to   Σ_t bytes_t(type_t) ≤ budget

`D_t(type)` is a tensor's measured sensitivity (`sensitivity.py`: estimated KL added at that type)
and `bytes_t(type)` its data size in the file (rows × row bytes, padded to the GGUF alignment). This
is a multiple-choice knapsack. The solver:
1. drops dominated options (no smaller and no less damaging than another) and starts every tensor at
   its smallest option (if even that does not fit: an error naming the smallest possible size);
2. solves it twice: greedily (upgrades along each tensor's lower convex hull of (bytes, damage),
   steepest damage reduction per byte first, while they fit) and exactly by dynamic programming on
   sizes rounded up to units of budget/32768 bytes (so its answer fits the exact budget too);
3. spends what each left: repeatedly the single upgrade that lowers damage most and fits;
   and keeps the better of the two.
The result never exceeds the budget (tests check it, and its gap to brute force on small problems).

Budgets: `--target-size` is the whole file; `file_budget` subtracts what does not depend on the type
choice (header, tensors that are not chosen) using a template file's layout. `--target-bpw` counts the
bits of all tensor data over all weights, as llama.cpp prints its "BPW".
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from ..errors import GemmaQuantError
from ..numerics.ggml.types import GGMLType, row_bytes

ALIGNMENT = 32  # GGUF's default general.alignment: each tensor's data is padded to it


def padded(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def tensor_bytes(shape: tuple[int, ...], qtype: GGMLType, alignment: int = ALIGNMENT) -> int:
    """A tensor's data bytes in a GGUF file at `qtype`, padding included (shape: torch order)."""
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return padded(rows * row_bytes(qtype, shape[-1]), alignment)


@dataclass(frozen=True)
class Option:
    qtype: GGMLType
    nbytes: int
    damage: float


@dataclass(frozen=True)
class Choice:
    name: str
    qtype: GGMLType
    nbytes: int
    damage: float
    why: str


def _frontier(opts: list[Option]) -> list[Option]:
    """Options no other beats in both bytes and damage, by increasing bytes (damage then decreases)."""
    out: list[Option] = []
    for o in sorted(opts, key=lambda o: (o.nbytes, o.damage, int(o.qtype))):
        if not out or o.damage < out[-1].damage:
            if out and o.nbytes == out[-1].nbytes:
                out[-1] = o
            else:
                out.append(o)
    return out


def _hull(front: list[Option]) -> list[Option]:
    """The lower convex hull of a frontier (bytes increasing, damage decreasing)."""
    hull: list[Option] = []
    for o in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> o: drop it
            if (b.damage - a.damage) * (o.nbytes - a.nbytes) >= (o.damage - a.damage) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def solve(options: dict[str, list[Option]], budget: int, cells: int = 1 << 15) -> dict[str, Choice]:
    """Choose one option per tensor: least total damage with Σ bytes ≤ budget (module doc)."""
    fronts = {}
    for name, opts in options.items():
        if not opts:
            raise GemmaQuantError(f"tensor '{name}' has no candidate type")
        fronts[name] = _frontier(opts)
    smallest = sum(f[0].nbytes for f in fronts.values())
    if smallest > budget:
        raise GemmaQuantError(f"a budget of {budget} bytes is below the smallest possible size of these "
                              f"tensors ({smallest} bytes with every tensor at its smallest candidate type)")
    best = None
    for pick, how in ((_greedy(fronts, budget), "greedy"), (_dp(fronts, budget, cells), "dp")):
        pick = _fill(fronts, pick, budget)
        dmg = sum(fronts[n][k].damage for n, k in pick.items())
        if best is None or dmg < best[0]:
            best = (dmg, pick, how)
    _, pick, how = best
    out = {}
    for name, f in fronts.items():
        o = f[pick[name]]
        why = "smallest candidate" if pick[name] == 0 else \
            f"{o.damage:.3g} estimated damage, {f[pick[name] - 1].damage - o.damage:.3g} less than " \
            f"{f[pick[name] - 1].qtype.name} for {o.nbytes - f[pick[name] - 1].nbytes} more bytes"
        out[name] = Choice(name, o.qtype, o.nbytes, o.damage, why)
    return out


def _greedy(fronts: dict[str, list[Option]], budget: int) -> dict[str, int]:
    """Upgrades along each tensor's lower convex hull, steepest first, while they fit."""
    cur = {name: 0 for name in fronts}
    used = sum(f[0].nbytes for f in fronts.values())
    hulls = {name: _hull(f) for name, f in fronts.items()}
    pos = {name: 0 for name in hulls}
    heap: list = []

    def push(name):
        h, k = hulls[name], pos[name]
        if k + 1 < len(h):
            a, b = h[k], h[k + 1]
            heapq.heappush(heap, ((b.damage - a.damage) / (b.nbytes - a.nbytes), name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, k = hulls[name], pos[name]
        step = h[k + 1].nbytes - h[k].nbytes
        if used + step > budget:
            continue  # this tensor's later hull steps are larger still
        used += step
        pos[name] = k + 1
        cur[name] = fronts[name].index(h[k + 1])
        push(name)
    return cur


def _dp(fronts: dict[str, list[Option]], budget: int, cells: int) -> dict[str, int]:
    """Exact multiple-choice knapsack on sizes rounded UP to units of ceil(budget/cells) bytes, so its
    answer always fits the exact budget."""
    unit = max(1, -(-budget // cells))
    cap = budget // unit
    names = list(fronts)
    inf = float("inf")
    cost = np.full(cap + 1, inf)
    cost[0] = 0.0  # cost[c]: least damage of the tensors so far using exactly c units
    picks = []
    for name in names:
        new = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for k, o in enumerate(fronts[name]):
            s = -(-o.nbytes // unit)
            if s > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[s:] = cost[:cap + 1 - s] + o.damage
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        cost = new
        picks.append(arg)
    c = int(np.argmin(cost))
    if not np.isfinite(cost[c]):  # rounding up made even the smallest choice too big: greedy decides
        return {name: 0 for name in names}
    out = {}
    for name, arg in zip(reversed(names), reversed(picks)):
        k = int(arg[c])
        out[name] = k
        c -= -(-fronts[name][k].nbytes // unit)
    return out


def _fill(fronts: dict[str, list[Option]], cur: dict[str, int], budget: int) -> dict[str, int]:
    """Spend what is left: repeatedly the single upgrade that lowers damage most and fits."""
    cur = dict(cur)
    used = sum(fronts[n][k].nbytes for n, k in cur.items())
    while True:
        best = None
        for name, f in fronts.items():
            c = f[cur[name]]
            for k in range(cur[name] + 1, len(f)):
                if used - c.nbytes + f[k].nbytes <= budget:
                    gain = c.damage - f[k].damage
                    if best is None or gain > best[0]:
                        best = (gain, name, k)
        if best is None or best[0] <= 0:
            return cur
        _, name, k = best
        used += fronts[name][k].nbytes - fronts[name][cur[name]].nbytes
        cur[name] = k


def total_bytes(choice: dict[str, Choice]) -> int:
    return sum(c.nbytes for c in choice.values())


def bpw_budget(target_bpw: float, n_weights: int, fixed_bytes: int) -> int:
    """Bytes left for the chosen tensors when all tensor data may take target_bpw bits per weight
    (`fixed_bytes`: the data of tensors not chosen, e.g. F32 norms)."""
    if not target_bpw > 0:
        raise GemmaQuantError(f"--target-bpw must be positive, got {target_bpw}")
    return int(target_bpw * n_weights / 8) - fixed_bytes


def parse_size(text: str) -> int:
    """'1.2GB', '900MiB', '123456789' -> bytes (SI units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise GemmaQuantError(f"--target-size {text!r} is not a size (examples: 1.2GB, 900MiB, 123456789) "
                              "nor 'preset' (the size of the scheme's own file)")
    return int(value * units[unit])
