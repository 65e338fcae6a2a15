"""ctypes binding to llama.cpp's own quantizer, `ggml_quantize_chunk` in libggml-base.

The library ships inside the llama_cpp (llama-cpp-python) package directory. `GGML_BASE_LIB` may
name the .so explicitly. Tests call `require_libggml()`, which skips with the reason when absent.
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


def ggml_quantize(w: torch.Tensor, qtype: int, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's bytes for `w` [rows, n_per_row] float32: uint8 [rows, row_bytes]."""
    lib = require_libggml()
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
