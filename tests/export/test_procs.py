"""procs.signals_deferred: a signal that lands while child processes are created is handed to the
handler that was in place, from ordinary code, once creation is over (not lost in an at-fork callback)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from gemmaquant.export.procs import signals_deferred


def _wait_for(cond, timeout=2.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.001)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_inside_is_replayed_after(sig):
    seen = []

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(sig, handler)
    try:
        reached_end = False
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), sig)
                _wait_for(lambda: False, 0.05)  # the handler would run here without the deferral
                assert seen == []
                reached_end = True
        assert reached_end and seen == [sig]
        assert signal.getsignal(sig) is handler
        assert sig not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(sig, old)


def test_nothing_happens_without_a_signal():
    before = signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with signals_deferred():
        pass
    assert (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])) == before


def test_ignored_signals_stay_ignored():
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)
