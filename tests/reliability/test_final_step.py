"""The write's final step and what runs leave behind (issue 15 §1, §3, §4), through the real CLI in process:
a failed rename puts the old output back, a path that appeared during the run is not replaced without
--force, a killed run's temporaries are cleaned by the next run, long names keep their temporaries
within NAME_MAX, a read-only file system gives one line, failed runs leave no directories behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import TINY_G3, check_error, digests, run_cli, tree, write_tiny

TINY_1L = {**TINY_G3, "num_hidden_layers": 1}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("final") / "tiny"
    write_tiny(d, TINY_1L)
    return d


def _q(m, out, scheme="q8_0", *extra):
    return ["quantize", m, "--scheme", scheme, "-o", out, "--quiet", *extra]


def _dead_pid() -> int:
    """A pid no process has: that of a child that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("scheme,name", [("q8_0", "x.gguf"), ("fp8", "x-FP8")])
def test_a_failed_final_rename_puts_the_old_output_back(scheme, name, good, tmp_path, capsys, monkeypatch):
    out = tmp_path / name
    assert run_cli(_q(good, out, scheme), capsys).code == 0
    before, sums = tree(tmp_path), digests(tmp_path)
    real = os.replace

    def failing(src, dst, *a, **k):
        if Path(src).name.startswith(f".{name}.tmp-"):  # the new output's rename into place
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", failing)
    check_error(run_cli(_q(good, out, scheme, "--force"), capsys), 3, "cannot write the output (Input/output error)")
    assert tree(tmp_path) == before and digests(tmp_path) == sums  # the old output, and no .old-/.tmp- names


@pytest.mark.parametrize("force", [False, True])
def test_a_path_that_appeared_during_the_run(force, good, tmp_path, capsys, monkeypatch):
    """Another run (or program) creates the output while this one writes: without --force the final step
    fails with exit 3 and the other output stays; with --force it is replaced."""
    import gemmaquant.export.atomic as atomic

    out = tmp_path / "x.gguf"
    real = atomic._fsync_path

    def intruder(p):
        if Path(p).name.startswith(".x.gguf.tmp-") and not out.exists():
            out.write_text("written by another run")
        return real(p)
    monkeypatch.setattr(atomic, "_fsync_path", intruder)
    res = run_cli(_q(good, out, "q8_0", *(["--force"] if force else [])), capsys)
    if force:
        assert res.code == 0 and out.read_bytes()[:4] == b"GGUF"
    else:
        check_error(res, 3, "appeared while this run was writing")
        assert out.read_text() == "written by another run"
    assert tree(tmp_path) == ["x.gguf"]


@pytest.mark.subprocess  # _dead_pid starts (and reaps) a child
def test_a_killed_runs_leftovers_are_cleaned_by_the_next_run(good, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    dead = _dead_pid()
    (tmp_path / f".x.gguf.tmp-{dead}-0123abcd").write_bytes(b"\0" * 4096)  # what SIGKILL leaves
    d = tmp_path / f".x.gguf.tmp-{dead}-4567abcd"
    d.mkdir()
    (d / "part").write_text("x")
    alive = tmp_path / f".x.gguf.tmp-{os.getppid()}-89abcdef"  # a live process's: never touched
    alive.write_text("in use")
    other = tmp_path / f".y.gguf.tmp-{dead}-0123abcd"  # another output's: never touched
    other.write_text("not ours")
    res = run_cli(_q(good, out), capsys)
    assert res.code == 0, res.stderr
    assert sorted(tree(tmp_path)) == sorted(["x.gguf", alive.name, other.name])
    assert res.stderr.count("note:") == 2 and "left by a run" in res.stderr


@pytest.mark.subprocess  # _dead_pid starts (and reaps) a child
def test_an_old_output_moved_aside_by_a_killed_run_is_put_back(good, tmp_path, capsys):
    """Killed between moving the old output aside and renaming the new one in: the next run puts the old
    one back, and then refuses to replace it without --force."""
    out = tmp_path / "x.gguf"
    aside = tmp_path / f".x.gguf.old-{_dead_pid()}-0123abcd"
    aside.write_text("the previous output")
    res = run_cli(_q(good, out), capsys)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.code == 3 and "Traceback" not in res.stderr and len(lines) == 2, res.stderr
    assert lines[0].startswith("note:") and "put back the previous output" in lines[0]
    assert lines[1].startswith("error:") and "output file already exists" in lines[1]
    assert out.read_text() == "the previous output" and tree(tmp_path) == ["x.gguf"]


@pytest.mark.parametrize("scheme,suffix", [("q8_0", ".gguf"), ("fp8", "")])
def test_long_output_names_keep_temporaries_within_name_max(scheme, suffix, good, tmp_path, capsys, monkeypatch):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    out = tmp_path / ("n" * (name_max - len(suffix)) + suffix)  # the longest valid name
    seen = []
    real_mkdir, real_open = Path.mkdir, os.open

    def spy(p, *a, **k):  # every temporary or lock name created beside the output
        if Path(p).parent == tmp_path:
            seen.append(Path(p).name)
        return real_open(p, *a, **k)
    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (seen.append(self.name) if self.parent == tmp_path
                                                              else None, real_mkdir(self, *a, **k))[1])
    res = run_cli(_q(good, out, scheme), capsys)
    assert res.code == 0, res.stderr
    assert tree(tmp_path)[0] == out.name and all(p.startswith(out.name) for p in tree(tmp_path))
    assert seen and all(len(n.encode()) <= name_max for n in seen), seen


def test_a_failed_run_leaves_no_directories_behind(good, tmp_path, capsys):
    from safetensors.torch import load_file

    t = load_file(good / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    bad = tmp_path / "src" / "nan"
    write_tiny(bad, TINY_1L, tensors=t)
    before = tree(tmp_path)
    for scheme, out in (("q8_0", tmp_path / "a" / "b" / "x.gguf"), ("fp8", tmp_path / "a" / "b" / "x")):
        check_error(run_cli(_q(bad, out, scheme), capsys), 2, "NaN")
        assert tree(tmp_path) == before  # not even the parents it created


def test_read_only_file_system_is_one_line(good, tmp_path, capsys, monkeypatch):
    """EROFS when the temporary is created, and again from the cleanup's unlink (which used to raise
    its own traceback); os.access is made to say yes so the write itself meets the error."""
    import gemmaquant.export.guard as guard
    import gemmaquant.export.gguf.writer as writer

    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(guard.os, "access", lambda *a, **k: True)
    monkeypatch.setattr(writer, "open", erofs, raising=False)
    monkeypatch.setattr(Path, "unlink", erofs)
    out = tmp_path / "x.gguf"
    check_error(run_cli(_q(good, out), capsys), 3, "cannot write the output (Read-only file system)")
    monkeypatch.undo()
    assert tree(tmp_path) == []


def test_a_read_only_directory_is_refused_up_front(good, tmp_path, capsys, monkeypatch):
    """os.access says no (EROFS or permissions): refused before any work, naming the directory."""
    import gemmaquant.export.guard as guard

    monkeypatch.setattr(guard.os, "access", lambda *a, **k: False)
    for scheme, out in (("q8_0", tmp_path / "x.gguf"), ("fp8", tmp_path / "x")):
        check_error(run_cli(_q(good, out, scheme), capsys), 3, "permission denied or a read-only file system")
    assert tree(tmp_path) == []


@pytest.mark.slow
def test_real_read_only_mount(good, tmp_path):
    """A tmpfs mounted read-only in a user namespace (skipped where unshare is not allowed)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    repo = Path(__file__).resolve().parents[2]
    script = (f"mount -t tmpfs -o ro,size=1m tmpfs {ro} && cd {repo} && "
              f"{sys.executable} -m gemmaquant.cli quantize {good} -s q8_0 -o {ro}/x.gguf -q; echo rc=$?")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unshare -rm (user namespaces) here")
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert "rc=3" in res.stdout, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "read-only file system" in lines[0] and "Traceback" not in res.stderr
