"""SIGINT / SIGTERM in the middle of a write (issue 8 §2): the real `gemmaquant quantize` process exits
with 130, says so in one line, and leaves neither the output nor a temporary (`.<name>.tmp-*`).

The signal is sent once the temporary exists, i.e. while tensors are being written. GGUF: a tiny
12-layer model at Q4_K_M (the K-quant scale search keeps the write busy for seconds). Safetensors: a
tiny model writes in well under a second, too fast to hit reliably, so the demo model (Gemma 3 270M,
FP8) is used there.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import TINY_G3, write_tiny

REPO = Path(__file__).resolve().parents[2]


def _interrupt_mid_write(args: list, out: Path, sig: int, settle: float = 0.3) -> subprocess.CompletedProcess:
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "gemmaquant.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.parent.glob(f".{out.name}.tmp-*")):
            if proc.poll() is not None:
                pytest.fail(f"finished (exit {proc.returncode}) before a temporary appeared: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no temporary output appeared within 300 s")
            time.sleep(0.01)
        time.sleep(settle)  # well inside the tensor loop
        assert proc.poll() is None, "the write finished before the signal could be sent"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _check(res, out: Path):
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == ["interrupted: nothing was left at the output path"], res.stderr
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary, no moved-aside old output


def test_sigint_during_gguf_write(tmp_path):
    src = tmp_path / "tiny"
    # 12 layers, ~12 M K-quant values: the write lasts seconds even on an idle machine
    write_tiny(src, dict(TINY_G3, num_hidden_layers=12, intermediate_size=1024))
    out = tmp_path / "out" / "tiny.Q4_K_M.gguf"
    res = _interrupt_mid_write(["quantize", src, "--scheme", "q4_k_m", "-o", out, "--quiet"], out, signal.SIGINT,
                               settle=0.05)
    _check(res, out)


def test_sigterm_during_safetensors_write(tmp_path, demo_dir):
    out = tmp_path / "out" / "gemma-3-270m-FP8"
    res = _interrupt_mid_write(["quantize", demo_dir, "--scheme", "fp8", "-o", out, "--quiet"], out, signal.SIGTERM,
                               settle=0.5)
    _check(res, out)
