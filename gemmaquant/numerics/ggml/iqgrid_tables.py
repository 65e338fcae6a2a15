"""The lattice tables of the IQ grid types (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S/IQ1_M),
rebuilt at run time from the installed `gguf` package, as llama.cpp's `iq2xs_init_impl` /
`iq3xs_init_impl` build them from their compressed grids.

A grid point is a short vector (8 weights for IQ2/IQ1, 4 for IQ3) of level indices l_i
(0..2 / 0..7). The quantizers work in odd coordinates `2*l + 1` and name a vector of levels by
its key `Σ l_i << bits*i`. For a key that is not on the grid, ggml keeps a list of neighbours:
the grid points whose squared distance (in odd coordinates) is among the `nwant` smallest
distinct distances, ordered by (distance, grid index). The quantizers then pick, among those, the
point with the least weighted error for the current scale.

gguf-py ships each grid (for dequantization) as its values; the level of a value is its position
in the type's `grid_map`. The keys rebuilt from it equal ggml's `kgrid_*` tables in value and
order. Only keys the quantizers can produce get neighbour lists (levels 0..2 for the 8-wide
types: 3^8 keys; all 4096 for IQ3). Lists are stored flat (CSR: start, count) and built once per
process, in ~0.1-1 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

# gguf.quants class name -> (bits per level in a key, neighbour distances kept (nwant), kMaxQ)
SPECS = {
    "IQ2_XXS": (2, 2, 3),
    "IQ2_XS": (2, 2, 3),
    "IQ2_S": (2, 1, 3),
    "IQ1_S": (2, 3, 3),  # IQ1_M shares IQ1_S's grid and tables
    "IQ3_XXS": (3, 2, 8),
    "IQ3_S": (3, 3, 8),
}


@dataclass(frozen=True)
class GridTables:
    values: torch.Tensor  # [G, n] float32: the dequantization grid (gguf-py's `grid`)
    pos: torch.Tensor  # [G, n] float32: odd coordinates 2*l + 1 of each grid point
    kmap: torch.Tensor  # [2^(bits*n)] int64: grid index of each key, -1 when off the grid
    start: torch.Tensor  # [2^(bits*n)] int64: first neighbour of each key in `flat`
    count: torch.Tensor  # [2^(bits*n)] int64: number of neighbours (0 on the grid or unreachable)
    flat: torch.Tensor  # [total] int64: neighbour grid indices, key by key
    flat_code: torch.Tensor  # [total, n] int64: i*kmax + level of coordinate i of each neighbour
    bits: int
    kmax: int  # levels a quantizer produces: 0..kmax-1

    @property
    def group(self) -> int:
        return self.pos.shape[1]

    @property
    def odd(self) -> torch.Tensor:
        """[kmax] float32: the odd coordinate 2*l + 1 of each level."""
        return torch.arange(1, 2 * self.kmax, 2, dtype=torch.float32, device=self.pos.device)


def grid_levels(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(levels [G, n] int64, values [G, n] float32) of a gguf-py grid class, e.g. "IQ3_S"."""
    from gguf import quants  # noqa: PLC0415 - ~0.2 s to import; only the IQ types need it

    cls = getattr(quants, name)
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    levels = np.searchsorted(np.asarray(cls.grid_map, dtype=np.float32), values)
    assert (np.asarray(cls.grid_map, dtype=np.float32)[levels] == values).all(), name
    return levels.astype(np.int64), values


def _neighbours(levels: np.ndarray, keys: np.ndarray, bits: int, nwant: int) -> tuple[np.ndarray, np.ndarray]:
    """For each key: the grid indices at the `nwant` smallest distinct squared distances, ordered by
    (distance, index). Returns (counts [len(keys)], flat indices)."""
    n = levels.shape[1]
    pos = (2 * levels + 1).astype(np.int32)  # [G, n]
    kpos = (2 * ((keys[:, None] >> (bits * np.arange(n))) & ((1 << bits) - 1)) + 1).astype(np.int32)  # [K, n]
    d2 = np.zeros((len(keys), len(pos)), dtype=np.int32)  # [K, G] small integers
    for i in range(n):
        d2 += (pos[None, :, i] - kpos[:, i, None]) ** 2
    dmax = int(d2.max()) + 1
    # rank of each distance among the distinct distances of its row
    present = np.zeros((len(keys), dmax), dtype=bool)
    np.put_along_axis(present, d2, True, axis=1)
    rank = np.cumsum(present, axis=1) - 1
    keep = np.take_along_axis(rank, d2, axis=1) < nwant  # [K, G]
    rows, cols = np.nonzero(keep)
    order = np.lexsort((cols, d2[rows, cols], rows))  # by key, then distance, then grid index
    return keep.sum(axis=1), cols[order]


@lru_cache(maxsize=None)
def _tables(name: str, device: str) -> GridTables:
    bits, nwant, kmax = SPECS[name]
    levels, values = grid_levels(name)
    g, n = levels.shape
    keys_on = (levels << (bits * np.arange(n))).sum(axis=1)
    size = 1 << (bits * n)
    kmap = np.full(size, -1, dtype=np.int64)
    kmap[keys_on] = np.arange(g)
    # reachable keys: every level below kmax
    digits = np.stack(np.meshgrid(*[np.arange(kmax)] * n, indexing="ij"), axis=-1).reshape(-1, n)
    reach = (digits << (bits * np.arange(n))).sum(axis=1)
    off = np.sort(reach[kmap[reach] < 0])
    count = np.zeros(size, dtype=np.int64)
    flat_parts = []
    for s in range(0, len(off), 1024):  # bounded memory: [1024, G] distances at a time
        c, f = _neighbours(levels, off[s : s + 1024], bits, nwant)
        count[off[s : s + 1024]] = c
        flat_parts.append(f)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    flat = np.concatenate(flat_parts)
    t = lambda a, dt=torch.int64: torch.from_numpy(np.ascontiguousarray(a)).to(dtype=dt, device=device)  # noqa: E731
    return GridTables(
        values=t(values, torch.float32),
        pos=t((2 * levels + 1).astype(np.float32), torch.float32),
        kmap=t(kmap),
        start=t(start),
        count=t(count),
        flat=t(flat),
        flat_code=t(levels[flat] + kmax * np.arange(n)),
        bits=bits,
        kmax=kmax,
    )


def grid_tables(name: str, device: torch.device | str = "cpu") -> GridTables:
    """The tables of grid `name` ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ3_XXS", "IQ3_S"), built
    once per process and device."""
    return _tables(name, str(device))


@lru_cache(maxsize=4)
def _ksigns(device: str) -> torch.Tensor:
    from gguf.quants import IQ2_XXS  # noqa: PLC0415

    return torch.tensor(list(IQ2_XXS.ksigns), dtype=torch.uint8, device=device)


def ksigns(device: torch.device | str = "cpu") -> torch.Tensor:
    """[128] uint8: 7 stored sign bits -> 8 sign bits (the 8th makes the number of minus signs
    even), gguf-py's `IQ2_XXS.ksigns`."""
    return _ksigns(str(device))
