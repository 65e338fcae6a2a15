"""GGML quantization in vectorized torch, byte-identical with llama.cpp's `ggml_quantize_chunk`.

`quantize(w [rows, n_per_row], qtype, imatrix [n_per_row] | None) -> uint8 [rows, row_bytes]`.
Without an imatrix ggml runs the `*_ref` routines, with one the `*_impl` routines; Q8_0 and the
float types ignore it, and the types `registry.REQUIRES_IMATRIX` lists cannot do without one. Each
type's quantizer lives in its family module (`registry.kernels`); this module checks the input and
feeds it rows in chunks, so that float32 temporaries stay small whatever the tensor size (the IQ
neighbour searches slice their work further, see `iqgrid.py`).
"""

from __future__ import annotations

import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.numerics import compiling
from gemmaquant.numerics.ggml import compiled_quantize
from gemmaquant.numerics.ggml.registry import kernels
from gemmaquant.numerics.ggml.types import GGMLType, ggml_type, row_bytes

# Values per chunk: 1 MB per float32 temporary; the K-quant searches keep ~15 of them alive. The
# size that ran fastest on CPU (benchmarks/RESULTS.md).
CHUNK_VALUES = 1 << 18


def quantize(
    w: torch.Tensor, qtype: GGMLType | int | str, imatrix: torch.Tensor | None = None, compiled: bool | None = None,
) -> torch.Tensor:
    """Quantize a [rows, n_per_row] tensor to GGML blocks; returns uint8 [rows, row_bytes].

    The source is read as float32 (a bf16/f16 tensor converts exactly, as llama-quantize does).
    `imatrix` is the per-column importance ([n_per_row], ≥ 0) from llama-imatrix. `compiled` picks the
    code that computes the same bytes (`compiled_quantize.py`): None (the default) runs the native C
    quantizers where they build (`GEMMAQUANT_NATIVE=0` turns them off), and the torch.compile'd searches
    as well when `compiling.enabled()` (`--compile`); True runs both; False only the plain torch quantizers.
    """
    qtype = ggml_type(qtype)
    if w.dim() != 2:
        raise GemmaQuantError(f"quantize expects a 2-D [rows, n_per_row] tensor, got shape {tuple(w.shape)}")
    rows, n = w.shape
    nbytes = row_bytes(qtype, n)
    k = kernels(qtype)
    if k.is_float:
        return k.quantize(w, None)
    w = w.to(torch.float32)
    if imatrix is None and k.needs_imatrix:
        raise GemmaQuantError(
            f"{qtype.name} needs an importance matrix: llama.cpp cannot quantize it without one "
            f"(compute one with `gemmaquant imatrix`, or pick a type that does not need it)"
        )
    if imatrix is not None:
        imatrix = imatrix.to(device=w.device, dtype=torch.float32).reshape(-1)
        if imatrix.numel() != n:
            raise GemmaQuantError(f"imatrix has {imatrix.numel()} values but the rows have {n} columns")
    out = torch.empty((rows, nbytes), dtype=torch.uint8, device=w.device)
    step = max(1, CHUNK_VALUES // n)
    inductor = compiling.enabled() if compiled is None else compiled
    for r in range(0, rows, step):
        x = w[r : r + step].contiguous()
        got = None if compiled is False else compiled_quantize.run(x, qtype, imatrix, inductor=inductor)
        out[r : r + step] = k.quantize(x, imatrix) if got is None else got
    return out
