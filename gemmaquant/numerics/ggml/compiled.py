"""The optional torch.compile path for dequantization (GGML blocks and compressed-tensors weights, CPU only),
with the plain path as fallback.

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

from gemmaquant.numerics.ggml.types import GGMLType

ENV = "GEMMAQUANT_COMPILE"
CHECK_BLOCKS = 64  # blocks compared bit for bit with the plain kernel on a type's first call

# BF16's kernel bit-casts the float16 view of its bytes; inductor notes the mix, harmlessly.
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")

_enabled = os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")
_kernels: dict[GGMLType, Callable | None] = {}  # compiled kernel per type, None once it failed
_checked: set[GGMLType] = set()  # types whose compiled output passed the bit check
_ct_kernels: dict[str, Callable | None] = {}  # the same for compressed-tensors, per fused.ct_* name
_ct_checked: set[tuple] = set()  # (name, code dtype, scale dtype, zero-point dtype)


class CompiledDequantWarning(UserWarning):
    """The compiled dequantizer was turned off for a type; the plain path is used instead."""


def set_enabled(flag: bool) -> None:
    """Use (or stop using) the compiled kernels where `dequantize` is not told either way."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _enabled


def compiled_types() -> list[str]:
    """Names of the kernels that have run compiled in this process (each passed its bit check): GGML
    types, and compressed-tensors kernels as e.g. 'ct_scaled(float8_e4m3fn)'."""
    ct = {f"{k[0]}({str(k[1]).removeprefix('torch.')})" for k in _ct_checked}
    return sorted({t.name for t in _checked} | ct)


DIFFERS = "its output differs from the plain kernel's bits"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtypes and bit patterns (NaN payloads included), for 2- or 4-byte floats."""
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(bits), b.view(bits))


def _why(e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _kernel(qtype: GGMLType) -> Callable | None:
    if qtype not in _kernels:
        from gemmaquant.numerics.ggml.fused import FUSED  # noqa: PLC0415

        fn = FUSED.get(qtype)
        # realize_opcount_threshold: inductor otherwise stores a long expression (Q5_K's) to a
        # buffer and reads it back in a second loop.
        _kernels[qtype] = (
            None if fn is None else torch.compile(fn, fullgraph=True, options={"realize_opcount_threshold": 1000})
        )
    return _kernels[qtype]


def _off(table: dict, key, name: str, why: str) -> None:
    """Never use this compiled kernel again in this process, and say why."""
    table[key] = None
    warnings.warn(f"compiled {name} dequantizer turned off ({why}); using the plain torch kernels",
                  CompiledDequantWarning, stacklevel=4)


def ct_run(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, plain: Callable) -> torch.Tensor | None:
    """compressed-tensors' (q - zp) * scale with a compiled kernel (`fused.ct_*`); None where the
    compiled path does not apply or failed (the caller then runs `plain(q, scale, zero_point)`). The
    first call per kernel and dtypes is compared bit for bit with `plain` on the whole tensor."""
    if q.is_cuda or q.numel() == 0 or q.ndim != 2:
        return None
    from gemmaquant.numerics.ggml import fused  # noqa: PLC0415

    grouped = scale.ndim == 2 and scale.shape[1] > 1
    if grouped and (q.shape[1] % scale.shape[1] or (zero_point is not None and zero_point.shape != scale.shape)):
        return None  # the plain path raises the clear error
    name = "ct_scaled" + ("_zp" if zero_point is not None else "")
    if name not in _ct_kernels:
        _ct_kernels[name] = torch.compile(getattr(fused, name), fullgraph=True)
    kernel = _ct_kernels[name]
    if kernel is None:
        return None
    n, k = q.shape
    args = [q, scale] if zero_point is None else [q, scale, zero_point]
    if grouped:  # group j of row i as row i*G + j: a [R, C] * [R, 1] loop, which inductor vectorizes
        g = scale.shape[1]  # with the sizes dynamic (a [N, G, K/G] view with K/G a symbol it does not)
        args = [q.contiguous().view(n * g, k // g)] + [t.reshape(n * g, 1) for t in args[1:]]
    for t in args:  # one graph for every weight shape, not one per shape until dims turn dynamic
        for d in range(t.ndim):
            if t.shape[d] > 1:
                torch._dynamo.maybe_mark_dynamic(t, d)
    try:
        got = kernel(*args).view(n, k)
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the plain path
        _off(_ct_kernels, name, name, _why(e))
        return None
    key = (name, q.dtype, scale.dtype, None if zero_point is None else zero_point.dtype)
    if key not in _ct_checked:
        ref = plain(q, scale, zero_point)
        if not _same_bits(ref, got):
            _off(_ct_kernels, name, name, DIFFERS)
            return ref
        _ct_checked.add(key)
    return got


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
        _off(_kernels, qtype, qtype.name, _why(e))
        return False
    if qtype not in _checked:
        n = min(CHECK_BLOCKS, blocks.shape[0])
        ref = torch.empty_like(rows[:n])
        plain(blocks[:n], ref)
        if not _same_bits(ref, rows[:n]):
            _off(_kernels, qtype, qtype.name, DIFFERS)
            return False
        _checked.add(qtype)
    return True
