"""GGML block dequantization in plain torch (CPU or CUDA), bit-equal to `gguf.quants.dequantize`.

Each type's eager kernel (its family module, found through `registry.kernels`) takes
`(b [nb, bytes] uint8, out [nb, block] float32)` and writes the same float32 expression as gguf-py's
numpy code, in the same association, e.g. Q4_K is `(d*sc)*q - dmin*m` (two roundings per weight,
never an FMA). This module checks the input, allocates the output and feeds the kernel chunks.

`compiled=True` (or `numerics.compiling.set_enabled(True)`, GEMMAQUANT_COMPILE=1) runs the types'
fused expressions through torch.compile on the CPU instead (`compiled.py`): one vectorized loop per
tensor, same bits, faster than the plain path after a compile per type (benchmarks/RESULTS.md
section 6); any failure falls back to the eager kernels with a warning.
"""

from __future__ import annotations

import math

import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.numerics import compiling
from gemmaquant.numerics.ggml import compiled as ggml_compiled
from gemmaquant.numerics.ggml.eager import empty_f32
from gemmaquant.numerics.ggml.registry import kernels
from gemmaquant.numerics.ggml.types import BLOCK, GGMLType, ggml_type

# Weights per chunk and thread (2 MB of float32 output each): every torch op pays a fixed dispatch
# cost, so chunks must be large, yet small enough that a chunk's temporaries stay in cache
# (benchmarks/RESULTS.md, dequantization).
CHUNK_VALUES = 1 << 19


def dequantize(
    data: torch.Tensor,
    qtype: GGMLType | int | str,
    shape: tuple[int, ...] | torch.Size,
    out: torch.Tensor | None = None,
    compiled: bool | None = None,
) -> torch.Tensor:
    """GGML bytes (uint8, [rows, row_bytes] or flat) -> float32 tensor of `shape` (torch order,
    the last dimension is the row). Runs on the device of `data`.

    `out`, a contiguous float32 tensor of `shape` on that device, is filled and returned instead
    of a new tensor: reusing one saves the page faults of fresh memory (see `eager.empty_f32`).
    `compiled`: use the torch.compile kernels (`numerics/ggml/compiled.py`, CPU only, same bits); None
    follows `numerics.compiling.set_enabled` / GEMMAQUANT_COMPILE."""
    qtype = ggml_type(qtype)
    block, nbytes = BLOCK[qtype]
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if data.dtype != torch.uint8:
        raise GemmaQuantError(f"dequantize expects uint8 bytes, got {data.dtype}")
    if not shape or shape[-1] % block != 0:
        raise GemmaQuantError(f"shape {shape}: the row is not a multiple of the {qtype.name} block of {block}")
    if data.numel() != n // block * nbytes:
        raise GemmaQuantError(
            f"{qtype.name} data of {data.numel()} bytes does not match shape {shape} "
            f"({n // block * nbytes} bytes expected)"
        )
    if out is None:
        out = empty_f32(shape, data.device)
    elif (out.dtype, tuple(out.shape), out.device) != (torch.float32, shape, data.device) or not out.is_contiguous():
        raise GemmaQuantError(
            f"dequantize out= must be a contiguous float32 {shape} tensor on {data.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if data.storage_offset() % 8:  # the kernels view whole blocks as int16 (and fields as int64)
        data = data.clone()
    blocks, rows = data.reshape(-1, nbytes), out.view(-1, block)
    kernel = kernels(qtype).dequantize
    if (compiling.enabled() if compiled is None else compiled) and ggml_compiled.run(blocks, qtype, rows, kernel):
        return out
    # One GPU launch set for the whole tensor; on the CPU, chunks of CHUNK_VALUES per thread
    # (each op splits its chunk between the threads).
    step = blocks.shape[0] if data.is_cuda else max(1, CHUNK_VALUES * torch.get_num_threads() // block)
    for i in range(0, blocks.shape[0], step):
        kernel(blocks[i : i + step], rows[i : i + step])
    return out
