"""ctypes binding to llama.cpp's own quantizer, `ggml_quantize_chunk` in libggml-base.

The library ships inside the llama_cpp (llama-cpp-python) package directory. `GGML_BASE_LIB` may
name the .so explicitly. Tests call `require_libggml()`, which skips with the reason when absent.

`ggml_quantize_chunk` asserts (aborting the whole process, not raising) when a type that needs an
importance matrix (IQ2_XXS, IQ2_XS, IQ1_S) gets none, so `ggml_quantize` refuses those calls
first. The IQ types build their grid tables on first use (seconds); `ggml_quantize_init` does it
up front, so that a test or benchmark can keep that cost apart.
"""

from __future__ import annotations

import ctypes
import glob
import os
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    candidates = []
    if os.environ.get("GGML_BASE_LIB"):
        candidates.append(os.environ["GGML_BASE_LIB"])
    try:
        import llama_cpp  # noqa: PLC0415
    except ImportError as exc:
        if not candidates:
            return None, f"llama_cpp (llama-cpp-python) is not importable: {exc}"
    else:
        pkg = os.path.dirname(llama_cpp.__file__)
        candidates += sorted(glob.glob(os.path.join(pkg, "**", "libggml-base*.so*"), recursive=True))
        candidates += sorted(glob.glob(os.path.join(pkg, "**", "libggml-base*.dylib"), recursive=True))
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]  # fmt: skip
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        return lib, path
    return None, f"no loadable libggml-base found (tried {candidates or 'nothing'})"


def require_libggml() -> ctypes.CDLL:
    from tests.tier import forbid  # noqa: PLC0415

    forbid("libggml (llama.cpp)", "llamacpp")
    lib, why = _load()
    if lib is None:
        import pytest  # noqa: PLC0415

        pytest.skip(f"llama.cpp reference quantizer unavailable: {why}")
    return lib


def requires_imatrix(qtype: int) -> bool:
    """ggml_quantize_requires_imatrix: llama.cpp's own list of types it will not quantize without one."""
    return bool(require_libggml().ggml_quantize_requires_imatrix(int(qtype)))


def ggml_quantize_init(qtype: int) -> None:
    """Build the type's tables now (IQ grids and neighbour lists; a no-op for the others)."""
    require_libggml().ggml_quantize_init(int(qtype))


def ggml_quantize(w: torch.Tensor, qtype: int, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's bytes for `w` [rows, n_per_row] float32: uint8 [rows, row_bytes]."""
    lib = require_libggml()
    if imatrix is None and lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"ggml type {int(qtype)} requires an imatrix (libggml would abort the process)")
    src = np.ascontiguousarray(w.detach().cpu().numpy(), dtype=np.float32)
    rows, n = src.shape
    nbytes = lib.ggml_row_size(int(qtype), n)
    dst = np.zeros((rows, nbytes), dtype=np.uint8)
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix.detach().cpu().numpy(), dtype=np.float32)
    written = lib.ggml_quantize_chunk(
        int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, n,
        None if imat is None else imat.ctypes.data,
    )  # fmt: skip
    assert written == rows * nbytes, (written, rows, nbytes)
    return torch.from_numpy(dst)


def ggml_round_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [rows, n] float32 as llama.cpp's CPU backend rounds a product's activations: through
    `quantize_row_q8_0_ref` (block 32) or `quantize_row_q8_K_ref` (block 256) and back through
    `dequantize_row_q8_0` / `dequantize_row_q8_K`, all in libggml-base."""
    lib = require_libggml()
    q, deq = (lib.quantize_row_q8_0_ref, lib.dequantize_row_q8_0) if block == 32 else \
        (lib.quantize_row_q8_K_ref, lib.dequantize_row_q8_K)
    for f in (q, deq):
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    nbytes = 34 if block == 32 else 4 + 256 + 2 * 16  # block_q8_0: fp16 d, 32 int8; block_q8_K: f32 d, 256 int8, 16 int16 sums
    src = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    rows, n = src.shape
    out = np.zeros_like(src)
    buf = np.zeros(n // block * nbytes, dtype=np.uint8)
    for r in range(rows):
        q(src[r].ctypes.data, buf.ctypes.data, n)
        deq(buf.ctypes.data, out[r].ctypes.data, n)
    return torch.from_numpy(out)
