"""llama.cpp (llama-cpp-python) as the tests' reference engine."""

from __future__ import annotations

from pathlib import Path

import pytest


def open_llama(path: str | Path, **kw):
    """`llama_cpp.Llama(path, **kw)` with llama.cpp's extra CPU buffer types off (`use_extra_bufts`:
    runtime weight repacking and the AMX kernels). On a CPU with AMX, llama-cpp-python 0.3.36 built from
    source segfaults in llama_decode on the tiny test models' Q4_0/Q4_K_M files with them on (the same
    files decode fine with them off); the plain CPU kernels are the reference we compare with anyway,
    and they do not change with the machine's instruction set."""
    from tests.tier import forbid

    forbid("llama.cpp", "llamacpp")
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = llama_cpp.llama_cpp  # the module llama.py takes its default parameters from
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), **kw)
    finally:
        lib.llama_model_default_params = default
