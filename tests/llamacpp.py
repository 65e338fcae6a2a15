"""llama.cpp (llama-cpp-python) as the tests' reference engine."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
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


def mtmd_image_embeddings(text_gguf, mmproj, rgb: np.ndarray, turn: tuple[str, str]) -> tuple[np.ndarray, bool, bool]:
    """libmtmd (llama-cpp-python's bindings): load a text GGUF + mmproj pair (weight repacking off, clip
    warmup off), tokenize a user turn holding one image (`turn`: the chat template's opening and closing
    of that turn) and encode the image. Returns (embeddings [tokens, n_embd], supports vision, supports
    audio)."""
    from tests.tier import forbid

    forbid("libmtmd", "llamacpp")
    llama_cpp = pytest.importorskip("llama_cpp")
    M = pytest.importorskip("llama_cpp.mtmd_cpp")
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.use_extra_bufts = False  # see open_llama
    model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(), mp)
    assert model
    cp = M.mtmd_context_params_default()
    cp.use_gpu, cp.n_threads, cp.print_timings, cp.warmup = False, 1, False, False
    ctx = M.mtmd_init_from_file(str(mmproj).encode(), model, cp)
    assert ctx
    h, w, _ = rgb.shape
    buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
    bmp = M.mtmd_bitmap_init(w, h, buf)
    chunks = M.mtmd_input_chunks_init()
    prompt = (turn[0] + M.mtmd_default_marker().decode() + " what is this?" + turn[1]).encode()
    txt = M.mtmd_input_text(text=prompt, text_len=len(prompt), add_special=True, parse_special=True)
    try:
        support = bool(M.mtmd_support_vision(ctx)), bool(M.mtmd_support_audio(ctx))
        assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(txt), (M.mtmd_bitmap_p_ctypes * 1)(bmp), 1) == 0
        n_embd = llama_cpp.llama_model_n_embd(model)
        images = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
        images = [c for c in images if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        assert len(images) == 1
        n = M.mtmd_input_chunk_get_n_tokens(images[0])
        assert M.mtmd_encode_chunk(ctx, images[0]) == 0
        emb = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * n_embd,)).reshape(n, n_embd).copy()
        return emb, *support
    finally:
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bmp)
        M.mtmd_free(ctx)
        llama_cpp.llama_model_free(model)
