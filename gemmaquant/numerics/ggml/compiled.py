"""The torch.compile path for GGML blocks (CPU only): each type's fused expression
(`GGMLKernels.fused`) compiled on first use with the number of blocks dynamic, its first call
checked bit for bit against the eager kernel; the switch and the fallback rules are
`numerics/compiling.py`'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from gemmaquant.numerics.compiling import DIFFERS, passed, same_bits, turn_off, why
from gemmaquant.numerics.ggml.registry import kernels
from gemmaquant.numerics.ggml.types import GGMLType

CHECK_BLOCKS = 64  # blocks compared bit for bit with the plain kernel on a type's first call

# BF16's kernel bit-casts the float16 view of its bytes; inductor notes the mix, harmlessly.
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")

_kernels: dict[GGMLType, Callable | None] = {}  # compiled kernel per type, None once it failed
_checked: set[GGMLType] = set()  # types whose compiled output passed the bit check


def _kernel(qtype: GGMLType) -> Callable | None:
    if qtype not in _kernels:
        fn = kernels(qtype).fused
        # realize_opcount_threshold: inductor otherwise stores a long expression (Q5_K's) to a
        # buffer and reads it back in a second loop.
        _kernels[qtype] = (
            None if fn is None else torch.compile(fn, fullgraph=True, options={"realize_opcount_threshold": 1000})
        )
    return _kernels[qtype]


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
        turn_off(_kernels, qtype, qtype.name, why(e))
        return False
    if qtype not in _checked:
        n = min(CHECK_BLOCKS, blocks.shape[0])
        ref = torch.empty_like(rows[:n])
        plain(blocks[:n], ref)
        if not same_bits(ref, rows[:n]):
            turn_off(_kernels, qtype, qtype.name, DIFFERS)
            return False
        _checked.add(qtype)
        passed(qtype.name)
    return True
