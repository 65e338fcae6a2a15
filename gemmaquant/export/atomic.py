"""All-or-nothing outputs: write into a temporary sibling, fsync, rename into place on success.

    with atomic_output(Path("out/gemma-2-2b-it-W4A16"), force=False, kind="dir", inputs=[src]) as tmp:
        ...write files under tmp...        # an exception or Ctrl-C here removes tmp; `out` untouched

The output guard (`guard.check_output`: never an input, file replaces file, --force only replaces our
own output directories) runs when the write starts and again at the final step, which holds a lock
file (`.<name>.lock`) so that two runs writing the same path cannot both rename into place: a path
that appeared since the start fails the run with OutputError (exit 3) unless `force`.

The temporary lives in the same parent directory (`.<name>.tmp-<pid>-<token>`), so the final step is
a rename within one filesystem. With `force` an existing output is replaced only after the new one is
complete: moved aside (`.<name>.old-<pid>-<token>`), the new one renamed in, the old one deleted; if
the rename fails the old one is put back. Leftovers of a killed run are cleaned up by the next run
(`guard.clean_stale`). Parent directories created for the output are removed again on failure.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError
from .guard import aside_path, check_output, clean_stale, lock_path, remove

LOCK_WAIT_S = 60.0  # the final step of another run holds the lock for a rename or two


def _fsync_path(path: Path) -> None:
    """fsync a file, or a directory entry table (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_parents(d: Path) -> list[Path]:
    """mkdir -p `d`; returns the directories it created, deepest first."""
    missing = []
    p = d
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for m in reversed(missing):
        try:
            m.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            _remove_parents(missing)
            raise OutputError(f"{d}: cannot create the output's parent directory ({e.strerror})") from None
    return missing


def _remove_parents(created: list[Path]) -> None:
    for m in created:  # deepest first; a directory another run now uses is not empty and stays
        try:
            m.rmdir()
        except OSError:
            pass


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `.<name>.lock` beside `path` (removed again when released)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): the final re-check still runs
        yield
        return
    lp = lock_path(path)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise OutputError(f"{path}: cannot create the lock file {lp.name} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise OutputError(f"{path}: another run has held {lp.name} for {LOCK_WAIT_S:.0f} s; "
                                  "is it still writing this output?") from None
            time.sleep(0.05)
            continue
        try:  # the file locked must still be the lock file (a releasing run unlinks it)
            same = os.stat(lp).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lp)
        os.close(fd)


def _commit(tmp: Path, path: Path, *, kind: str, force: bool, inputs, option: str) -> None:
    """The final step: under the lock, re-check the guard and rename `tmp` into place."""
    old = None
    with _locked(path):
        there = os.path.lexists(path)
        if there and not force and not (kind == "dir" and path.is_dir() and not any(path.iterdir())):
            raise OutputError(f"{path}: appeared while this run was writing (another run or program created "
                              "it); nothing was replaced")
        check_output(path, force=force, kind=kind, inputs=inputs, option=option)
        try:
            if there:
                old = aside_path(path, "old")
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            # decided by what is on disk, not by how far this code got: a signal may land anywhere
            if old is not None and os.path.lexists(old) and not os.path.lexists(path):
                os.replace(old, path)
            raise
    if old is not None:
        remove(old)
    _fsync_path(path.parent)


@contextlib.contextmanager
def atomic_output(path: str | Path, *, force: bool, kind: str = "dir", inputs=(),
                  option: str = "--out") -> Iterator[Path]:
    """Yield a temporary path (a created directory for kind="dir", a not-yet-existing file path for
    kind="file"); on normal exit it is fsynced and renamed to `path`, on any exception (including
    KeyboardInterrupt) it is removed and `path` is left as it was. `inputs`: the paths the output
    must never be, lie in or contain (see guard.py)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    clean_stale(path)  # before the check: it may put a killed run's moved-aside output back
    path = check_output(path, force=force, kind=kind, inputs=inputs, option=option)
    created = _make_parents(path.parent)
    tmp = aside_path(path, "tmp")
    try:
        if kind == "dir":
            tmp.mkdir()
        yield tmp
        if kind == "dir":
            for p in tmp.rglob("*"):
                if p.is_file():
                    _fsync_path(p)
        _fsync_path(tmp)
        _commit(tmp, path, kind=kind, force=force, inputs=inputs, option=option)
    except OSError as e:
        remove(tmp)
        _remove_parents(created)
        raise OutputError(f"{path}: cannot write the output ({e.strerror or e})") from None
    except BaseException:
        remove(tmp)
        _remove_parents(created)
        raise


def write_report(path: str | Path, text: str, *, force: bool, inputs=(), option: str = "--json") -> None:
    """A report file (eval/compare --json/--markdown) through the same guard and rename as every output."""
    with atomic_output(path, force=force, kind="file", inputs=inputs, option=option) as tmp:
        tmp.write_text(text, encoding="utf-8")
