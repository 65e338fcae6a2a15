"""Refuse to start a write that cannot fit: compare the output's estimated size with the free space of
the filesystem it will land on, before any calibration or quantization time is spent.

The estimate comes from the per-tensor plan (`pipeline.ct_plan` / `gguf_plan`, exact to the byte for
tensor data) plus the files carried beside the weights. With --force the old output is only removed
after the new one is complete, so the new one needs its full size whatever exists at the path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import OutputError
from ..formats.inputs import human_bytes

MARGIN_BYTES = 16 << 20  # headers, GGUF metadata beyond the estimate, filesystem rounding


def existing_ancestor(path: Path) -> Path:
    """The nearest directory at or above `path` that exists (the output's parent may not yet)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p if p.is_dir() else p.parent


def check_free_space(out_path: str | Path, needed_bytes: int, margin: int = MARGIN_BYTES) -> int:
    """Raise OutputError naming the path, the needed and the free bytes when `needed_bytes` (+ margin)
    does not fit on the filesystem that will hold `out_path`. Returns the free bytes."""
    where = existing_ancestor(Path(out_path))
    try:
        free = shutil.disk_usage(where).free
    except OSError as e:  # unknown free space: let the write itself report a full disk
        if e.errno is None:
            raise
        return -1
    if needed_bytes + margin > free:
        raise OutputError(f"{out_path}: not enough disk space: the output needs about {human_bytes(needed_bytes)} "
                          f"({needed_bytes} bytes) but {where} has {human_bytes(free)} ({free} bytes) free")
    return free
