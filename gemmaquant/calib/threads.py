"""How the error-feedback passes use the machine's threads without the thread count reaching a result.

Their bytes and budget plans must not depend on `--threads` (issue 21: byte-identical with 1 or 2
threads). torch's own threads split a product differently for each thread count, and MKL then sums
the long, thin float32 products of a wide input (31B's down_proj: 21504 channels) in a different
order. So those products run on one torch thread (`single_thread`), and the threads are used one
level up instead (`parallel_map`): independent jobs (column blocks of H, row blocks of a factor,
blocks of a product) fixed in advance by the shapes alone, each on one torch thread, run concurrently
on as many Python threads as torch was given, their results taken in order. A job's result is then
the same on any thread: 1 or 16 threads give the same bytes.

The calibration's forward passes go the same way (`calib/runner.py`): each pass on one torch thread,
its Linears' products as jobs by blocks of output features (`linear`), the statistics' XᵀX by blocks
of columns (`add_gram`). MKL's sums there depend on the thread count too, on most shapes of 31B and
on some of smaller models (RESULTS.md §11, fourteenth round): the statistics of 31B's layer 0 came
out different on 1 and 2 threads, and so would the bytes calibrated on them.

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


OUT_BLOCK = 512  # output features per job of `linear`
GRAM_BLOCK = 512  # columns per job of `add_gram`


def linear(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x Wᵀ (`F.linear` without a bias) by blocks of `OUT_BLOCK` rows of W, as jobs of `parallel_map`:
    the same values on any thread count."""
    n_out, n_in = W.shape
    x2 = x.reshape(-1, n_in)
    out = x2.new_empty((x2.shape[0], n_out))

    def block(a):
        out[:, a:a + OUT_BLOCK] = x2 @ W[a:a + OUT_BLOCK].T

    parallel_map(block, range(0, n_out, OUT_BLOCK))
    return out.view(*x.shape[:-1], n_out)


def add_gram(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + aᵀ b (a [T, n], b [T, m]; acc [n, m] or None for zeros), added in place by blocks of
    `GRAM_BLOCK` columns of b, as jobs of `parallel_map`: the same values on any thread count, and no
    [n, m] temporary (31B's down_proj input: 1.85 GB per mini-batch)."""
    if acc is None:
        acc = a.new_zeros((a.shape[1], b.shape[1]))

    def block(c):
        acc[:, c:c + GRAM_BLOCK] += a.T @ b[:, c:c + GRAM_BLOCK]

    parallel_map(block, range(0, b.shape[1], GRAM_BLOCK))
    return acc
