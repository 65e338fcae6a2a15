"""All-or-nothing outputs: write into a temporary sibling, fsync, rename into place on success.

    with atomic_output(Path("out/gemma-2-2b-it-W4A16"), force=False, kind="dir") as tmp:
        ...write files under tmp...        # an exception or Ctrl-C here removes tmp; `out` untouched

The temporary lives in the same parent directory (`.<name>.tmp-<pid>-<random>`), so the final step is
a rename within one filesystem. An existing output is refused unless `force`; with `force` it is
replaced only after the new output is complete (moved aside, new one renamed in, old one deleted).
An existing *empty* directory is not worth protecting and is replaced without `force`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_output(path: Path, *, force: bool) -> None:
    """Refuse an existing output unless `force` (call early, before any expensive work)."""
    if path.is_symlink() or path.exists():
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            return
        if not force:
            what = "directory" if path.is_dir() else "file"
            raise OutputError(f"{path}: output {what} already exists and is not empty (use --force to replace it)")


@contextlib.contextmanager
def atomic_output(path: str | Path, *, force: bool, kind: str = "dir") -> Iterator[Path]:
    """Yield a temporary path (a created directory for kind="dir", a not-yet-existing file path for
    kind="file"); on normal exit it is fsynced and renamed to `path`, on any exception (including
    KeyboardInterrupt) it is removed and `path` is left as it was."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind {kind!r} (allowed: dir, file)")
    path = Path(path).absolute()
    check_output(path, force=force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path.parent}: cannot create the output's parent directory ({e.strerror})") from None
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if kind == "dir":
            tmp.mkdir()
        yield tmp
        if kind == "dir":
            for p in tmp.rglob("*"):
                if p.is_file():
                    _fsync_path(p)
        _fsync_path(tmp)
        old = None
        if path.is_symlink() or path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous output back
                os.replace(old, path)
            raise
        if old is not None:
            _remove(old)
        _fsync_path(path.parent)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"{path}: cannot write the output ({e.strerror or e})") from None
    except BaseException:
        _remove(tmp)
        raise
