"""The switch and the safety net shared by the optional torch.compile dequantizers of both format
families (`ggml/compiled.py`, `ct/compiled.py`; CPU only, the plain kernels as fallback).

Off by default. `set_enabled(True)`, the CLI's `--compile` or `GEMMAQUANT_COMPILE=1` turn it on;
`dequantize(..., compiled=True)` asks for it per call. Each kernel is compiled on first use (about
1-4 s; inductor caches the C++ on disk, so later processes load it faster) with its sizes dynamic,
so that one compiled kernel serves every tensor. The first call of each kernel is compared bit for
bit with the plain kernel (`same_bits`): a compiler that fused a product into an FMA, or anything
else that changes a value, turns the compiled kernel off for the process with a
`CompiledDequantWarning`, and so does any failure to compile (no C++ compiler, an unsupported
platform). CUDA tensors always take the plain path: inductor would generate Triton kernels there.
The GGML quantizers under the same switch prefer native C code built with the system C compiler
(`ggml/native.py`), with the same bit check and the torch.compile'd searches as fallback.
"""

from __future__ import annotations

import os
import warnings

import torch

ENV = "GEMMAQUANT_COMPILE"
DIFFERS = "its output differs from the plain kernel's bits"

_enabled = os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")
_passed: set[str] = set()  # names of the kernels whose compiled output passed the bit check


class CompiledDequantWarning(UserWarning):
    """A compiled dequantizer was turned off; the plain path is used instead."""


def set_enabled(flag: bool) -> None:
    """Use (or stop using) the compiled kernels where `dequantize` is not told either way."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _enabled


def passed(name: str) -> None:
    """Record that the compiled kernel `name` ran and passed its bit check."""
    _passed.add(name)


def compiled_types() -> list[str]:
    """Names of the kernels that have run compiled in this process (each passed its bit check): GGML
    types, and compressed-tensors kernels as e.g. 'ct_scaled(float8_e4m3fn)'."""
    return sorted(_passed)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtypes and bit patterns (NaN payloads included), for 2- or 4-byte floats."""
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(bits), b.view(bits))


def why(e: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def turn_off(table: dict, key, name: str, reason: str, what: str = "dequantizer",
             instead: str = "the plain torch kernels") -> None:
    """Never use this compiled kernel again in this process, and say why and what runs `instead`."""
    table[key] = None
    warnings.warn(f"compiled {name} {what} turned off ({reason}); using {instead}",
                  CompiledDequantWarning, stacklevel=4)

