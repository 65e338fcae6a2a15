"""SIGINT / SIGTERM / SIGHUP in the middle of a write (issue 8 §2, issue 15 §4): the real `gemmaquant
quantize` process exits with 130, says so in one line, and leaves neither the output nor a temporary
(`.<name>.tmp-*`). SIGKILL cannot be caught: its leftovers are removed by the next run. Two runs writing
one path at once: one wins, the other fails at its final step with exit 3 (issue 15 §1).

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
pytestmark = pytest.mark.subprocess  # every test here signals a real `gemmaquant quantize` process


def _cli(args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gemmaquant.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt_mid_write(args: list, out: Path, sig: int, settle: float = 0.3) -> subprocess.CompletedProcess:
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = _cli(args)
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


def _lines(stderr: str) -> list[str]:
    """stderr's lines but the `note:`s quantize prints before it works (the tiny models' sliding pattern
    is not llama.cpp's: issue 18's warning)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("note:", " "))]


def _check(res, out: Path):
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr
    lines = _lines(res.stderr)
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


def test_sigint_during_a_multi_preset_write_leaves_none_of_the_files(tmp_path):
    """A set writes all its files at once: Ctrl-C leaves none of them and no temporary."""
    src = _twelve_layers(tmp_path)
    d = tmp_path / "out" / "set"
    res = _interrupt_mid_write(["quantize", src, "--scheme", "q8_0,q4_k_m,q4_k_s", "-o", d, "--quiet"],
                               d / "tiny.Q4_K_S.gguf", signal.SIGINT, settle=0.05)
    assert res.returncode == 130, res.stderr
    assert _lines(res.stderr) == ["interrupted: nothing was left at the output path"], res.stderr
    assert list(d.iterdir()) == []


def test_sigterm_during_safetensors_write(tmp_path, demo_dir):
    out = tmp_path / "out" / "gemma-3-270m-FP8"
    res = _interrupt_mid_write(["quantize", demo_dir, "--scheme", "fp8", "-o", out, "--quiet"], out, signal.SIGTERM,
                               settle=0.5)
    _check(res, out)


def _twelve_layers(tmp_path: Path) -> Path:
    src = tmp_path / "tiny"
    # 12 layers, ~12 M K-quant values: the write lasts seconds even on an idle machine
    write_tiny(src, dict(TINY_G3, num_hidden_layers=12, intermediate_size=1024))
    return src


def test_sighup_during_gguf_write(tmp_path):
    """The terminal closing (SIGHUP) cleans up like Ctrl-C; it used to leave the temporary and say nothing."""
    src = _twelve_layers(tmp_path)
    out = tmp_path / "out" / "tiny.Q4_K_M.gguf"
    res = _interrupt_mid_write(["quantize", src, "--scheme", "q4_k_m", "-o", out, "--quiet"], out, signal.SIGHUP,
                               settle=0.05)
    _check(res, out)


# Fires SIGINT at this process from inside its first os.fork() (an at-fork "before" callback, where
# CPython reports an exception and drops it, as in the after-fork callback a real Ctrl-C used to hit),
# then runs the CLI: the pool's fork is exactly the window where Ctrl-C was lost (exit 0, file written).
_FORK_HOOK = """
import os, signal, sys
fired = []
def _sigint_in_fork():
    if not fired:
        fired.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # bytecodes: the handler runs here unless the signal is deferred
            pass
os.register_at_fork(before=_sigint_in_fork)
sys.argv[0] = "gemmaquant"
from gemmaquant.cli.app import main
main()
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGHUP"])
def test_signal_while_workers_fork_is_not_lost(tmp_path, sig):
    src = tmp_path / "tiny"
    write_tiny(src)
    out = tmp_path / "out" / "tiny.Q4_K_M.gguf"
    out.parent.mkdir()
    hook = _FORK_HOOK.replace("signal.SIGINT", f"signal.{sig}")
    proc = subprocess.run([sys.executable, "-c", hook, "quantize", str(src), "--scheme", "q4_k_m", "-o", str(out),
                           "--quiet", "--threads", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, proc.stderr)
    _check(res, out)


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path):
    src = _twelve_layers(tmp_path)
    out = tmp_path / "out" / "tiny.Q4_K_M.gguf"
    args = ["quantize", src, "--scheme", "q4_k_m", "-o", out, "--quiet"]
    # communicate() returning also shows the forked workers died with it (they held its pipes and,
    # before procs.die_with_parent, waited on their queue forever)
    res = _interrupt_mid_write(args, out, signal.SIGKILL, settle=0.05)
    assert res.returncode == -signal.SIGKILL
    left = [p.name for p in out.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(".tiny.Q4_K_M.gguf.tmp-"), left
    proc = _cli(args)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert f"removed {left[0]}, left by a run" in " ".join(stderr.split())


def test_two_runs_to_one_output(tmp_path):
    """q8_0 and q4_k_m to the same --out at the same time, no --force: exactly one succeeds, the other
    exits 3 saying the path appeared (or, if it started late, already exists); the file is the winner's,
    whole, and nothing else is left beside it."""
    import gguf

    src = _twelve_layers(tmp_path)
    out = tmp_path / "out" / "same.gguf"
    out.parent.mkdir()
    procs = {s: _cli(["quantize", src, "--scheme", s, "-o", out, "--quiet"]) for s in ("q8_0", "q4_k_m")}
    res = {s: (p.wait(timeout=600), p.stderr.read()) for s, p in procs.items()}
    codes = sorted(code for code, _ in res.values())
    assert codes == [0, 3], res
    winner = next(s for s, (code, _) in res.items() if code == 0)
    loser_err = next(e for code, e in res.values() if code == 3)
    lines = _lines(loser_err)
    assert len(lines) == 1 and ("appeared while this run was writing" in lines[0] or "already exists" in lines[0])
    assert "Traceback" not in loser_err
    assert [p.name for p in out.parent.iterdir()] == ["same.gguf"]
    ftype = gguf.GGUFReader(out).fields["general.file_type"].contents()
    assert ftype == {"q8_0": 7, "q4_k_m": 15}[winner]
