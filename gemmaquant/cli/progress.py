"""The progress display of long runs: one rich Progress on stderr (transient; `enabled=False`, i.e.
--quiet / --json, shows nothing) holding two kinds of task, fed by the library's callbacks
`progress(done, total, what)`:

  writes        source bytes done of total, bytes/s, ETA, the current tensor. Tensors differ in size by
                1000x (a 262k-row embedding vs a norm), so a count of tensors gives a useless ETA; source
                bytes track the work closely (every byte is read and quantized once).
  calibration   decoder layers done of all (imatrix, GPTQ/AWQ/SmoothQuant, sensitivity passes), the
                layer under way; shown while a pass runs, gone when it ends.

Both live in one display because a quantize run calibrates while its write task is already shown, and
rich draws one live display per console.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

BYTES, STEPS = "bytes", "steps"


class _ByUnit(ProgressColumn):
    """A column that renders a byte task one way and a counted task another (or not at all)."""

    def __init__(self, for_bytes: ProgressColumn, for_steps: ProgressColumn | None):
        super().__init__()
        self.for_bytes, self.for_steps = for_bytes, for_steps

    def render(self, task):
        col = self.for_bytes if task.fields.get("unit", BYTES) == BYTES else self.for_steps
        return Text("") if col is None else col.render(task)


def progress_display(enabled: bool = True, console=None) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    _ByUnit(DownloadColumn(binary_units=False), MofNCompleteColumn()),
                    _ByUnit(TransferSpeedColumn(), None), TimeElapsedColumn(),
                    _ByUnit(TextColumn("ETA"), None), _ByUnit(TimeRemainingColumn(), None),
                    TextColumn("{task.fields[what]}"),
                    console=console or Console(stderr=True), transient=True, disable=not enabled)


def byte_task(bar: Progress, label: str):
    """A write task shown from now on; returns its `progress(done, total, tensor)` callback."""
    task = bar.add_task(label, total=None, what="", unit=BYTES)

    def progress(done: int, total: int, tensor: str) -> None:
        bar.update(task, total=total, completed=done, what=tensor)
    return progress


def steps_task(bar: Progress, label: str = "calibrating"):
    """A `progress(done, total, what)` callback for counted passes (calibration layers): each pass gets a
    task on its first call and loses it when done reaches total."""
    task = None

    def progress(done: int, total: int, what: str) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(label, total=total, what=what, unit=STEPS)
        bar.update(task, total=total, completed=done, what=what)
        if done >= total:
            bar.remove_task(task)
            task = None
    return progress
