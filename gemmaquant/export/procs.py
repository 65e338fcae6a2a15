"""Child processes die with their parent.

The GGUF writer's worker processes and its header process outlive a parent killed by SIGKILL (or the
kernel's OOM killer), which no handler can catch: forked pool workers wait forever on their queue,
each holding its own mapping of the checkpoint. On Linux a child asks the kernel to send it SIGKILL
when its parent goes (prctl PR_SET_PDEATHSIG); elsewhere this does nothing.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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
