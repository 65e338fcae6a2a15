"""Child processes: they die with their parent, and forking them never loses a signal.

The GGUF writer's worker processes and its header process outlive a parent killed by SIGKILL (or the
kernel's OOM killer), which no handler can catch: forked pool workers wait forever on their queue,
each holding its own mapping of the checkpoint. On Linux a child asks the kernel to send it SIGKILL
when its parent goes (prctl PR_SET_PDEATHSIG); elsewhere this does nothing.

Ctrl-C (or SIGTERM/SIGHUP, which the CLI turns into KeyboardInterrupt) that lands while `os.fork()`
runs is handled at the parent's first Python bytecode after the fork, which is an at-fork callback
(logging's `_releaseLock`). CPython reports an exception raised there as "Exception ignored" and drops
it, so the run went on and exited 0 with the file written. `signals_deferred` puts recording handlers
in place while processes are created and replays what arrived once it is over; a child forked inside
it calls `child_signals` to get the parent's own handlers back (SIGINT ignored).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEFERRED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
_saved: dict = {}  # the handlers signals_deferred replaced; what a child forked inside it restores


def die_with_parent() -> None:
    """Call first thing in a child process."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl: the child may outlive a killed parent
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Fork child processes inside this: SIGINT/SIGTERM/SIGHUP that arrive meanwhile are recorded,
    and the first one is handed to the handler that was in place when the block ends (so Ctrl-C
    raises KeyboardInterrupt from ordinary code, never from an at-fork callback that swallows it).

    The signals are also blocked for this thread, so a child starts with them blocked: a Ctrl-C to
    the process group stays pending in it until `child_signals` has set its handlers. Only the main
    thread can set handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    got: list[int] = []

    def record(signum, frame):
        got.append(signum)

    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED)
    old = {s: signal.getsignal(s) for s in DEFERRED}
    _saved.update(old)
    try:
        for s, h in old.items():
            if callable(h):  # SIG_IGN stays ignored, SIG_DFL keeps the kernel's action
                signal.signal(s, record)
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _saved.clear()
        # a signal still pending for this thread is delivered now, to the restored handler
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if got and callable(old[got[0]]):
            old[got[0]](got[0], None)


def child_signals() -> None:
    """In a child forked inside `signals_deferred`: ignore SIGINT (Ctrl-C reaches the whole process
    group; the parent stops its children), restore the parent's SIGTERM/SIGHUP handlers, then
    unblock, so a signal sent while the child started is delivered to those."""
    for s in DEFERRED:
        if s == signal.SIGINT:
            signal.signal(s, signal.SIG_IGN)
        elif s in _saved:
            signal.signal(s, _saved[s])
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, DEFERRED)
