"""How the error-feedback passes use the machine's threads without the thread count reaching a result.

Their bytes and budget plans must not depend on `--threads` (issue 21: byte-identical with 1 or 2
threads). torch's own threads split a product differently for each thread count, and MKL then sums
the long, thin float32 products of a wide input (31B's down_proj: 21504 channels) in a different
order. So those products run on one torch thread (`single_thread`), and the threads are used one
level up instead (`parallel_map`): independent jobs (column blocks of H, row blocks of a factor,
blocks of a product) fixed in advance by the shapes alone, each on one torch thread, run concurrently
on as many Python threads as torch was given, their results taken in order. A job's result is then
the same on any thread: 1 or 16 threads give the same bytes.

Python threads suit these jobs: each is a few large products, and torch releases the GIL inside
them (RESULTS.md §11, thirteenth round: 31B's down_proj in 0.54x the time on 2 cores). They do not
suit a chain of small ops, like GPTQ's column loop: there the GIL serializes the dispatch (two
threads gained nothing), so that loop stays on one thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

R = TypeVar("R")
_local = threading.local()  # .requested: the thread count before the outermost single_thread; .worker


@contextmanager
def single_thread():
    """Run on one torch thread. For the GPTQ column loops: their ops are small (one column of a tensor),
    and with two threads each ends in a barrier that a busy machine stretches up to 30x (measured
    here). For the products of a wide H: MKL's sums of such long, thin products differ with the number
    of threads. One thread keeps every result, and so the bytes and budget plans, independent of --threads.
    The count it replaces stays known to `parallel_map` inside."""
    n = torch.get_num_threads()
    outer = getattr(_local, "requested", None) is None
    if outer:
        _local.requested = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        if outer:
            _local.requested = None


def workers() -> int:
    """Threads `parallel_map` may use here: torch's count (as before any `single_thread`), 1 in a job."""
    if getattr(_local, "worker", False):
        return 1
    return getattr(_local, "requested", None) or torch.get_num_threads()


def parallel_map(fn: Callable[..., R], items: Iterable) -> list[R]:
    """[fn(item) for item in items], each call on one torch thread, on up to `workers()` threads at once.
    The caller fixes the items, never from the thread count: each result is then the same however
    many threads run them. Calls inside a job run in that job's thread, one after another."""
    items = list(items)
    n = min(workers(), len(items))
    with single_thread():
        if n <= 1:
            return [fn(x) for x in items]

        def job(x):
            _local.worker = True
            # this thread's own count: MKL and OpenMP read it per thread, and a new thread starts at
            # the machine's default, not at the 1 set above
            torch.set_num_threads(1)
            return fn(x)

        with ThreadPoolExecutor(n, thread_name_prefix="gemmaquant-rows") as pool:
            futures = [pool.submit(job, x) for x in items]
            try:
                return [f.result() for f in futures]
            except BaseException:  # an error or Ctrl-C: queued jobs are dropped, running ones finish
                for f in futures:
                    f.cancel()
                raise
