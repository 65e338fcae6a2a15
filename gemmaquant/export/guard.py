"""The one output guard every writer goes through: GGUF files, compressed-tensors directories, imatrix
files and the `--json` / `--markdown` / `--plot` reports of eval and compare.

Rules (paths compared after resolving symlinks and `..`, never as typed):
1. An output is never one of the command's inputs (model directory, artifact, text, imatrix, recipe),
   never inside an input directory and never a directory that contains an input.
2. An empty path is an error (Path("") would silently mean the current directory).
3. A file output (GGUF, imatrix, report) replaces an existing regular file only with --force, and
   never replaces a directory or anything that is not a regular file (/dev/null, a FIFO).
4. A directory output (compressed-tensors) replaces an empty directory, or with --force one of our own
   output directories, and never a file. Ours means: it holds MARKER (`gemmaquant.json`, written last
   into every output directory, listing every file written) and nothing that the marker does not
   list. A directory someone added a file to, or one without the marker, is never deleted.

`check_output` applies the rules; `export/atomic.py` applies them at the start of a write and again,
under a lock file, at the final rename. The names of temporaries beside the output are made here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path

from ..errors import GemmaQuantError, OutputError

MARKER = "gemmaquant.json"
MARKER_KIND = "gemmaquant output"
_TAGS = ("tmp", "old")
log = logging.getLogger("gemmaquant")


def _resolved(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _protected(inputs) -> list[tuple[Path, bool, str]]:
    """(resolved path, is a directory, as given) for each input, plus the resolved targets of the
    symlinks directly inside an input directory (a Hugging Face cache snapshot links its files to
    blobs elsewhere: replacing a blob would destroy the model as surely as replacing the link)."""
    out = []
    for x in inputs:
        if x is None or str(x) in ("", "-"):
            continue
        p = Path(x)
        if not os.path.lexists(p):
            continue
        r = _resolved(p)
        isdir = r.is_dir()
        out.append((r, isdir, str(x)))
        if isdir:
            try:
                entries = list(os.scandir(r))
            except OSError:
                continue
            for e in entries:
                if e.is_symlink():  # protected itself and its ancestors; "inside" only counts for inputs
                    out.append((_resolved(Path(e.path)), False, f"{x} (via {e.name})"))
    return out


def _state(p: Path) -> str:
    """'absent', 'file', 'dir', 'empty dir' or the kind of special file at `p` (symlinks followed;
    a dangling symlink is a 'file': replacing the link loses nothing)."""
    if not os.path.lexists(p):
        return "absent"
    try:
        st = os.stat(p)
    except OSError:
        return "file"
    if stat.S_ISDIR(st.st_mode):
        try:
            return "dir" if any(os.scandir(p)) else "empty dir"
        except OSError:
            return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    from ..formats.inputs import kind_of

    return kind_of(st.st_mode)


def foreign_reason(d: Path) -> str | None:
    """None when `d` is one of our output directories (rule 4), else why it is not."""
    m = d / MARKER
    try:
        if m.is_file() and not m.is_symlink():
            with open(m, "rb") as f:
                data = json.loads(f.read(1 << 20))
        else:
            data = None
    except (OSError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or data.get("written_by") != "gemmaquant" or not isinstance(data.get("files"), list):
        return f"it has no {MARKER} from gemmaquant"
    listed = {f for f in data["files"] if isinstance(f, str)} | {MARKER}
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError as e:
        return f"it cannot be listed ({e.strerror})"
    for e in entries:
        if e.name not in listed:
            return f"it holds '{e.name}', which gemmaquant did not write there"
        if e.is_dir(follow_symlinks=False):
            return f"'{e.name}' in it is a directory"
    return None


def write_marker(d: Path, **info) -> None:
    """Write MARKER into the (temporary) output directory `d`, listing every file now in it."""
    from .. import __version__

    files = sorted(p.name for p in d.iterdir()) + [MARKER]
    data = {"written_by": "gemmaquant", "version": __version__, "what": MARKER_KIND, **info,
            "files": sorted(set(files))}
    (d / MARKER).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def existing_ancestor(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output(path: str | Path, *, force: bool, kind: str = "dir", inputs=(), option: str = "--out") -> Path:
    """Apply the module's rules to an output about to be written; returns it as an absolute path.

    kind: "file" or "dir". inputs: every path the command reads (files or directories). Raises
    OutputError (exit 3) naming the path and the rule, GemmaQuantError (exit 2) for an empty path."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind {kind!r} (allowed: dir, file)")
    if str(path) == "":
        raise GemmaQuantError(f"{option}: the path is empty (give a file or directory name)")
    p = Path(os.path.abspath(Path(path).expanduser()))
    r = _resolved(p)
    for src, isdir, given in _protected(inputs):
        if r == src:
            raise OutputError(f"{path}: is an input of this command ({given}); refusing to write over it")
        if isdir and src in r.parents:
            raise OutputError(f"{path}: lies inside the input {given}; write the output outside it")
        if r in src.parents:
            raise OutputError(f"{path}: contains the input {given}; refusing to write over it")
    state = _state(p)
    what = "file" if kind == "file" else "directory"
    if state == "absent" or (kind == "dir" and state == "empty dir"):
        pass
    elif kind == "file" and state != "file":
        shown = "a directory" if state in ("dir", "empty dir") else state
        raise OutputError(f"{path}: is {shown}; a {what} output never replaces it (pick another path)")
    elif kind == "dir" and state != "dir":
        raise OutputError(f"{path}: is {'a file' if state == 'file' else state}; a {what} output never replaces "
                          "it (pick another path)")
    elif kind == "dir":
        why = foreign_reason(p)
        if why is not None:
            raise OutputError(f"{path}: the directory exists and is not a gemmaquant output ({why}); --force only "
                              "replaces gemmaquant's own output directories, so pick another path")
        if not force:
            raise OutputError(f"{path}: output directory already exists (use --force to replace it)")
    elif not force:
        raise OutputError(f"{path}: output file already exists (use --force to replace it)")
    anc = existing_ancestor(p.parent)
    if not anc.is_dir():
        raise OutputError(f"{p.parent}: cannot create the output's parent directory ({anc} is not a directory)")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write in {anc} (permission denied or a read-only file system)")
    return p


# -- names beside the output --------------------------------------------------------------------------
def _name_max(d: Path) -> int:
    try:
        return os.pathconf(existing_ancestor(d), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def aside_stem(path: Path) -> str:
    """The output's name as used in its temporaries' names: the name itself, or for a long one
    (the filesystem's NAME_MAX minus the 22 bytes of '.', '.tmp-', pid and token) a cut of it plus
    a hash of the whole, so `.<stem>.tmp-<pid>-<token>` always fits and stays unique per output."""
    name = path.name
    budget = _name_max(path.parent) - 23
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= budget:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:8]
    cut = raw[: max(1, budget - 9)].decode("utf-8", "ignore")
    return f"{cut}~{digest}"


def aside_path(path: Path, tag: str) -> Path:
    """A fresh `.<stem>.<tag>-<pid>-<token>` beside `path` (tag: tmp, old)."""
    import secrets

    return path.parent / f".{aside_stem(path)}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def lock_path(path: Path) -> Path:
    return path.parent / f".{aside_stem(path)}.lock"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove(path: Path) -> None:
    """Best-effort removal (file, link or directory tree): cleanup must never raise over the error
    that caused it, a read-only file system's EROFS included."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


def clean_stale(path: Path) -> None:
    """Finish what a killed run (SIGKILL, the OOM killer) left beside `path`: its temporaries are
    removed; an old output it had moved aside is put back if nothing replaced it, else removed
    (the replacement had completed). Only names of this output whose process is gone are touched."""
    pat = re.compile(rf"^\.{re.escape(aside_stem(path))}\.({'|'.join(_TAGS)})-(\d+)-[0-9a-f]{{8}}$")
    try:
        entries = [e.name for e in os.scandir(path.parent)]
    except OSError:
        return
    for name in sorted(entries, key=lambda n: ".old-" not in n):  # old outputs first: put them back
        m = pat.match(name)
        if m is None or _alive(int(m.group(2))):
            continue
        p = path.parent / name
        if m.group(1) == "old" and not os.path.lexists(path):
            try:
                os.replace(p, path)
                log.warning(f"{path}: put back the previous output that an interrupted run (pid {m.group(2)}) "
                            f"had moved aside to {name}")
                continue
            except OSError:
                pass
        remove(p)
        log.warning(f"{path}: removed {name}, left by a run (pid {m.group(2)}) that is gone")
