"""What a type family module declares per GGML type: `TYPES = {GGMLType.X: GGMLKernels(...)}`.

`registry.py` assembles the families' tables; `quantize()`, `dequantize()` and the compiled path
look a type's kernels up there, so a new type is a new family module (plus its enum value, BLOCK
and F16_FIELDS in `types.py`, which stays torch-free) and one line in the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gemmaquant.numerics.ggml.fused import Fused

# (x [rows, n] source rows, imatrix [n] float32 | None) -> [rows, row_bytes] uint8
RowQuantizer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
# (x [nb, block] float32, qw [nb, block] importance | None) -> [nb, block_bytes] uint8
BlockQuantizer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
# (b [nb, block_bytes] uint8, out [nb, block] float32) -> None: gguf-py's values written into out
Dequantizer = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class GGMLKernels:
    """One type's kernels. `quantize` gets float32 row chunks (or, for a float type, the whole
    source tensor in its own dtype: a conversion needs neither chunks nor an imatrix);
    `dequantize` is the eager kernel, `fused` the torch.compile expression (None: the eager kernel
    always runs); `needs_imatrix`: llama.cpp refuses to quantize the type without one;
    `compiled_search`: the quantizer runs `search.py`'s scale searches, which `--compile` compiles."""

    quantize: RowQuantizer
    dequantize: Dequantizer
    fused: Fused | None = None
    needs_imatrix: bool = False
    is_float: bool = False
    compiled_search: bool = False

    def __post_init__(self) -> None:
        if self.is_float and self.needs_imatrix:
            raise ValueError("a float type cannot need an importance matrix")


def tile_imatrix(imatrix: torch.Tensor, rows: int, block: int) -> torch.Tensor:
    """The [n] importance repeated for every row and cut like the weights: [rows * n/block, block]."""
    n = imatrix.numel()
    return imatrix.reshape(1, n).expand(rows, n).reshape(-1, block)


def per_block(fn: BlockQuantizer, block: int, uses_imatrix: bool = True) -> RowQuantizer:
    """A row quantizer from a block quantizer: the rows cut into blocks, the importance tiled to
    them (not at all where the type ignores it, as ggml's Q8_0 does)."""

    def quantize_rows(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
        rows = x.shape[0]
        qw = tile_imatrix(imatrix, rows, block) if imatrix is not None and uses_imatrix else None
        return fn(x.reshape(-1, block), qw).reshape(rows, -1)

    quantize_rows.__name__ = quantize_rows.__qualname__ = getattr(fn, "__name__", "quantize_rows")
    return quantize_rows
