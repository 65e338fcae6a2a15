"""Whole GGUF files written with the compiled scale searches (`quantize --compile`) against
llama-quantize's, through both ways the writer runs its searches: forked worker processes (which
inherit the switch and build or load the native library, or compile, in the child) and threads
(where the test can see which path ran). The native C searches (the default under --compile) run
always; the torch.compile'd ones (GEMMAQUANT_NATIVE=0) are compile-heavy on a cold inductor cache:
only with GEMMAQUANT_COMPILE_TESTS=1.

Open bug: in the whole suite (one long process, a cold cache), the threads case once got a float64
`mins` out of the compiled make_qkx (Q4_K), so the compiled path turned itself off with a warning and
the plain path wrote the bytes; alone, cold or warm, it passes. Not yet understood."""
from __future__ import annotations

import os
import warnings

import pytest

from gemmaquant.export.gguf.writer import write_gguf
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.formats.demo import ensure_demo_checkpoint
from gemmaquant.numerics import compiling
from gemmaquant.numerics.ggml import compiled_quantize, native
from gemmaquant.schemes import get_scheme

from . import llamacpp_ref as ref
from .test_writer_presets import _imatrix, _same_file

pytestmark = [pytest.mark.llamacpp, pytest.mark.subprocess]


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    """test_writer_presets' 256-wide tiny Gemma 3 (every K-quant block written, no fallback)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny256c")
    d = ref.tiny_checkpoint("gemma3-256", root / "tiny-gemma3-256-1M")
    return d, ref.convert(d, "bf16"), _imatrix(root, Checkpoint(d).config)


EVERY = os.environ.get("GEMMAQUANT_COMPILE_TESTS") == "1"


@pytest.mark.parametrize("workers", ["processes", "threads"])
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["no-imatrix", "imatrix"])
@pytest.mark.parametrize("path", ["native", "inductor"])
def test_compiled_q4_k_m_identical_to_llama_quantize(tiny256, tmp_path, monkeypatch, workers, with_imatrix, path):
    if path == "inductor" and not EVERY:  # each compiles Q4_K/Q6_K again, cold (minutes); see the module doc
        pytest.skip("set GEMMAQUANT_COMPILE_TESTS=1 for the whole compiled files (minutes of compiling)")
    if path == "native":
        try:
            native.library()
        except native.NativeError as e:
            pytest.skip(str(e))
    else:
        monkeypatch.setenv(native.ENV, "0")
    d, bf16, im = tiny256
    monkeypatch.setattr(compiling, "_enabled", True)
    if workers == "threads":
        monkeypatch.setenv("GEMMAQUANT_GGUF_WORKERS", "threads")
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiling.CompiledDequantWarning)
        _same_file(Checkpoint(d), bf16, "q4_k_m", tmp_path, im if with_imatrix else None)
    if workers == "threads":
        suffix = " (native)" if path == "native" else ""
        assert {f"quantize Q4_K{suffix}", f"quantize Q6_K{suffix}"} <= set(compiling.compiled_types())


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["no-imatrix", "imatrix"])
@pytest.mark.parametrize("preset,qtype", [("q3_k_m", "Q3_K"), ("iq4_xs", "IQ4_XS")])
def test_native_whole_low_bit_files_identical(tiny256, tmp_path, monkeypatch, preset, qtype, with_imatrix):
    """The whole Q3_K and IQ4_XS quantizers in C (threads, so that the test sees the native path ran)."""
    try:
        native.library()
    except native.NativeError as e:
        pytest.skip(str(e))
    d, bf16, im = tiny256
    monkeypatch.setattr(compiling, "_enabled", True)
    monkeypatch.setattr(compiling, "_passed", set())  # this test's bit checks only
    monkeypatch.setattr(compiled_quantize, "_native_checked", set())
    monkeypatch.setenv("GEMMAQUANT_GGUF_WORKERS", "threads")
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiling.CompiledDequantWarning)
        _same_file(Checkpoint(d), bf16, preset, tmp_path, im if with_imatrix else None)
    assert f"quantize {qtype} (native)" in compiling.compiled_types()


@pytest.mark.demo
def test_native_demo_q4_k_m_identical_to_llama_quantize(tmp_path, monkeypatch):
    """The real demo (Gemma 3 270M) → q4_k_m with --compile (the native searches, in the writer's
    forked workers) byte-identical to convert_hf_to_gguf.py + llama-quantize."""
    try:
        native.library()  # loaded before the workers fork: they inherit it
    except native.NativeError as e:
        pytest.skip(str(e))
    d = ensure_demo_checkpoint()
    want = ref.quantize(ref.convert(d, "bf16"), tmp_path / "ref.gguf", get_scheme("q4_k_m").ftype)
    monkeypatch.setattr(compiling, "_enabled", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiling.CompiledDequantWarning)
        got = write_gguf(Checkpoint(d), "q4_k_m", tmp_path / "ours.gguf").path
    assert got.stat().st_size == want.stat().st_size
    assert got.read_bytes() == want.read_bytes()
