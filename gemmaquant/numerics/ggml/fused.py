"""What the fused dequantizers share: each type family writes one broadcast expression per type
(`GGMLKernels.fused`) which torch.compile turns into one fused, vectorized C++ loop over the output
(read the packed bytes, write the result once); `compiled.py` runs them.

The eager kernels are the plain path: ~10-20 torch ops per chunk, each a pass over memory. These
expressions are slower than that run eagerly (every intermediate is built at full size) and only
pay off compiled; `dequantize(..., compiled=True)` uses them on the CPU. Not on CUDA: inductor
generates Triton there, and these kernels promise to need no Triton.

Every expression keeps gguf-py's float32 association (`d * q`, `(d*sc)*q - dmin*m`, `d*q + m`);
inductor's C++ is built with -ffp-contract=off, so no product is fused into an FMA, and the tests
check the compiled output bit-equal to gguf's numpy dequantizers.

Written for inductor's vectorizer: the innermost dimension is a contiguous run of the block's bytes;
low/high nibbles, quarters and bit planes are chosen with `where` on small constant masks over outer
dimensions (a stack or cat is materialized as its own pass; a shift by a per-element amount leaves
the loop scalar). Inputs: `b`, the [nb, nbytes] uint8 blocks, and `f`, the same memory viewed as
float16 (every block size and f16 field offset is even), so f16 fields are plain loads; each kernel
writes `out`, [nb, block] float32. Each is its own function (its own code object) so that dynamo
caches one compiled graph per type.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Fused = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def store(out: torch.Tensor, values: torch.Tensor) -> None:
    """Write `values` (any shape with out's element order) into `out`: inductor fuses the copy into
    the loop's store, so the float32 output is written once."""
    out.view(values.shape).copy_(values)


def select(*conds_and_values: torch.Tensor) -> torch.Tensor:
    """where(c0, v0, where(c1, v1, ... vN)): selects per outer index without a concat (inductor
    materializes stack/cat; a select on a constant mask stays in the one vectorized loop)."""
    *pairs, last = conds_and_values
    out = last
    for i in range(len(pairs) - 2, -1, -2):
        out = torch.where(pairs[i], pairs[i + 1], out)
    return out


def const(values: list[int], shape: tuple[int, ...], device: torch.device, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).view(shape)


def lohi(qs: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Low nibbles where `lo`, high nibbles elsewhere, of int32 bytes broadcast over `lo`."""
    return torch.where(lo, qs & 0x0F, qs >> 4)


def lo_first(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[True, False] along the size-2 dimension of `shape`: low nibbles first, then high."""
    return const([1, 0], shape, device, torch.bool)
