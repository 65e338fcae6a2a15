"""The same command twice gives byte-identical outputs, also with a different number of threads
(issue 8 §3): GGUF K-quants (whose scale search is a float argmin, sensitive to summation order) and
compressed-tensors FP8 (RTN) and W4A16 (calibrated with the default algorithm: forward passes,
Hessians and GPTQ all run under --threads)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from . import TINY_G3, run_cli, write_tiny

TINY_1L = {**TINY_G3, "num_hidden_layers": 1}
CALIB = ["--calib-samples", "4", "--calib-len", "32"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("det") / "tiny"
    write_tiny(d, TINY_1L, seed=3)
    return d


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _digests(path) -> dict[str, str]:
    """sha256 per output file; README.md is left out: its model card quotes the command line, which
    differs in `--threads`."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name != "README.md")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("scheme,out_name,extra", [
    ("q4_k_m", "t.Q4_K_M.gguf", []),
    ("q6_k", "t.Q6_K.gguf", []),
    ("fp8", "t-FP8", []),
    pytest.param("w4a16", "t-W4A16", CALIB, marks=pytest.mark.slow),  # GPTQ calibration twice: seconds
])
def test_same_bytes_with_1_and_2_threads(src, tmp_path, capsys, scheme, out_name, extra):
    outs = []
    for threads in (1, 2):
        out = tmp_path / f"threads{threads}" / out_name
        res = run_cli(["quantize", src, "--scheme", scheme, "-o", out, "--threads", threads, "--quiet", *extra], capsys)
        assert res.code == 0, res.stderr
        outs.append(out)
    a, b = (_digests(o) for o in outs)
    assert a == b
    assert any(n.endswith((".gguf", ".safetensors")) for n in a)


@pytest.mark.parametrize("scheme,out_name", [("q4_k_m", "t.Q4_K_M.gguf"), ("q4_0", "t.Q4_0.gguf")])
def test_gguf_same_bytes_from_worker_processes_and_threads(src, tmp_path, capsys, monkeypatch, scheme, out_name):
    """On Linux the GGUF searches run in forked worker processes (GEMMAQUANT_GGUF_WORKERS=threads
    keeps them on threads): the bytes must not depend on where a slab was quantized."""
    from gemmaquant.export.gguf.workers import processes_available

    if not processes_available():
        pytest.skip("no fork here: threads only")
    outs = []
    for mode in ("processes", "threads"):
        monkeypatch.setenv("GEMMAQUANT_GGUF_WORKERS", mode)
        out = tmp_path / mode / out_name
        res = run_cli(["quantize", src, "--scheme", scheme, "-o", out, "--threads", 2, "--quiet"], capsys)
        assert res.code == 0, res.stderr
        outs.append(out)
    a, b = (_digests(o) for o in outs)
    assert a == b
