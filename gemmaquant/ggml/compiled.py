"""The optional torch.compile path for GGML dequantization (CPU only), with the plain path as fallback.

Off by default. `set_enabled(True)`, the CLI's `--compile` or `GEMMAQUANT_COMPILE=1` turn it on;
`dequantize(..., compiled=True)` asks for it per call. Each type is compiled on first use (about
1-4 s; inductor caches the C++ on disk, so later processes load it faster), with the number of
blocks dynamic so that one compiled kernel serves every tensor of that type. The first call of each
type also runs the plain kernel on the first blocks and compares the bits: a compiler that fused a
product into an FMA, or anything else that changes a value, turns the compiled path off for that
type with a warning, and so does any failure to compile (no C++ compiler, an unsupported platform).
CUDA tensors always take the plain path: inductor would generate Triton kernels there.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from gemmaquant.ggml.types import GGMLType

ENV = "GEMMAQUANT_COMPILE"
CHECK_BLOCKS = 64  # blocks compared bit for bit with the plain kernel on a type's first call

# BF16's kernel bit-casts the float16 view of its bytes; inductor notes the mix, harmlessly.
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")

_enabled = os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")
_kernels: dict[GGMLType, Callable | None] = {}  # compiled kernel per type, None once it failed
_checked: set[GGMLType] = set()


class CompiledDequantWarning(UserWarning):
    """The compiled dequantizer was turned off for a type; the plain path is used instead."""


def set_enabled(flag: bool) -> None:
    """Use (or stop using) the compiled kernels where `dequantize` is not told either way."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _enabled


def compiled_types() -> list[str]:
    """Names of the types that have run compiled in this process (each passed its bit check)."""
    return sorted(t.name for t in _checked)


def _kernel(qtype: GGMLType) -> Callable | None:
    if qtype not in _kernels:
        from gemmaquant.ggml.fused import FUSED  # noqa: PLC0415

        fn = FUSED.get(qtype)
        # realize_opcount_threshold: inductor otherwise stores a long expression (Q5_K's) to a
        # buffer and reads it back in a second loop.
        _kernels[qtype] = (
            None if fn is None else torch.compile(fn, fullgraph=True, options={"realize_opcount_threshold": 1000})
        )
    return _kernels[qtype]


def _off(qtype: GGMLType, why: str) -> None:
    _kernels[qtype] = None
    warnings.warn(
        f"compiled {qtype.name} dequantizer turned off ({why}); using the plain torch kernels",
        CompiledDequantWarning,
        stacklevel=3,
    )


def run(blocks: torch.Tensor, qtype: GGMLType, rows: torch.Tensor, plain: Callable) -> bool:
    """Dequantize `blocks` ([nb, nbytes] uint8, contiguous) into `rows` ([nb, block] float32) with
    the compiled kernel; False (nothing written) where the compiled path does not apply or failed."""
    if blocks.is_cuda or blocks.shape[0] == 0:
        return False
    kernel = _kernel(qtype)
    if kernel is None:
        return False
    f16 = blocks.view(torch.int16).view(torch.float16)
    for t in (blocks, f16, rows):
        torch._dynamo.maybe_mark_dynamic(t, 0)  # one graph for every number of blocks
    try:
        kernel(blocks, f16, rows)
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the plain path
        _off(qtype, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return False
    if qtype not in _checked:
        n = min(CHECK_BLOCKS, blocks.shape[0])
        ref = torch.empty_like(rows[:n])
        plain(blocks[:n], ref)
        if not torch.equal(ref.view(torch.int32), rows[:n].view(torch.int32)):
            _off(qtype, "its output differs from the plain kernel's bits")
            return False
        _checked.add(qtype)
    return True
