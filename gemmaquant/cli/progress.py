"""The progress bar of long writes: source bytes done of total, bytes/s, ETA, current tensor.

Tensors differ in size by 1000x (a 262k-row embedding vs a norm), so a count of tensors gives a
useless ETA; source bytes processed track the work closely (every byte is read and quantized once).
On stderr, transient; `enabled=False` (--quiet / --json) shows nothing.
"""

from __future__ import annotations


def byte_progress(enabled: bool = True, console=None):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=False),
                    TransferSpeedColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    TextColumn("{task.fields[tensor]}"),
                    console=console or Console(stderr=True), transient=True, disable=not enabled)
