"""calib/threads.py: jobs on the threads torch was given, each on one torch thread, results in order;
and the error-feedback rounding of a wide input, which runs its products as such jobs, gives the same
bytes on 1, 2 and 3 threads."""

from __future__ import annotations

import threading

import pytest
import torch

from gemmaquant.calib import ggml_gptq, hessian, threads
from gemmaquant.calib.threads import parallel_map, single_thread, workers


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_jobs_run_concurrently_in_order_on_one_torch_thread_each(two_threads):
    barrier = threading.Barrier(2, timeout=10)  # broken unless both jobs run at once

    def job(x):
        barrier.wait()
        return x * 10, torch.get_num_threads(), threading.get_ident()

    got = parallel_map(job, [1, 2])
    assert [r[0] for r in got] == [10, 20]
    assert [r[1] for r in got] == [1, 1]
    assert got[0][2] != got[1][2] and threading.get_ident() not in (got[0][2], got[1][2])
    assert torch.get_num_threads() == 2  # restored


def _openmp_max_threads():
    """This thread's OpenMP thread count (what MKL's products use), from the OpenMP runtime torch loaded."""
    import ctypes
    from pathlib import Path

    maps = Path("/proc/self/maps")
    torch_lib = str(Path(torch.__file__).parent)  # llama.cpp's tests may have loaded another runtime
    libs = sorted({line.split()[-1] for line in maps.read_text().splitlines()
                   if ("libgomp" in line or "libiomp" in line) and torch_lib in line}) if maps.exists() else []
    if not libs:
        pytest.skip("no OpenMP runtime of torch's found in this process")
    return ctypes.CDLL(libs[0]).omp_get_max_threads


def test_a_jobs_products_use_one_thread(two_threads):
    """A new thread starts at OpenMP's default (the machine's cores), not at torch's count: each job
    sets its own, or MKL would split its products (and their sums) over the cores."""
    omp = _openmp_max_threads()
    assert parallel_map(lambda _: omp(), range(4)) == [1] * 4


def test_inside_single_thread_the_callers_count_still_applies(two_threads):
    with single_thread():
        assert torch.get_num_threads() == 1
        assert workers() == 2
        with single_thread():
            assert workers() == 2
    assert workers() == 2 and torch.get_num_threads() == 2


def test_jobs_inside_a_job_run_in_its_thread(two_threads):
    def inner(_):
        return threading.get_ident()

    def outer(_):
        assert workers() == 1
        return parallel_map(inner, range(3)), threading.get_ident()

    for idents, mine in parallel_map(outer, range(2)):
        assert idents == [mine] * 3


def test_one_thread_runs_the_jobs_in_the_caller():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert parallel_map(lambda _: threading.get_ident(), range(3)) == [threading.get_ident()] * 3
    finally:
        torch.set_num_threads(before)


def test_an_error_in_a_job_reaches_the_caller_and_the_count_is_restored(two_threads):
    def job(x):
        if x == 3:
            raise ValueError("job 3")
        return x

    with pytest.raises(ValueError, match="job 3"):
        parallel_map(job, range(6))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q4_0"])
def test_wide_feedback_bytes_do_not_depend_on_the_thread_count(qtype, monkeypatch):
    """The whole wide path with several jobs in every step: the factor's fill, trailing updates and
    inverse (64-column panels), the feedback's block product (`FEED` 96), the losses' and W·H's column
    blocks and the refit's normal equations. It checks that the jobs are fixed by the shapes and their
    results taken in order; at these sizes MKL's own threads would not change the sums, so that each job
    runs on one thread is `test_a_jobs_products_use_one_thread`'s to check."""
    monkeypatch.setattr(hessian, "WIDE", 256)
    monkeypatch.setattr(hessian, "PANEL", 64)
    monkeypatch.setattr(hessian, "BLOCK", 64 * 512)
    monkeypatch.setattr(ggml_gptq, "FEED", 96)
    n, rows = 512, 48
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2 * n, n // 4, generator=g) @ torch.randn(n // 4, n, generator=g) + torch.randn(2 * n, n, generator=g)
    H = X.T @ X
    W = (torch.randn(rows, n, generator=g) * 0.02).bfloat16().float()
    imat = H.diagonal() / X.shape[0]
    before = torch.get_num_threads()
    got = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert threads.workers() == t
            o = ggml_gptq.optimize_tensor(W, H, qtype, imat)
            got.append((o.data, o.loss, o.loss_llama))
    finally:
        torch.set_num_threads(before)
    assert got[0][1] < got[0][2]  # the feedback did its work
    for data, loss, loss_llama in got[1:]:
        assert torch.equal(data, got[0][0])
        assert (loss, loss_llama) == got[0][1:]


# shapes where this machine's MKL sums a float32 product differently on 1 and 2 torch threads
# (RESULTS.md §11, fourteenth round): a short batch, few outputs, a wide input
PRODUCT_SHAPES = [(16, 4608, 64), (128, 8192, 640), (512, 2048, 64)]


@pytest.mark.parametrize("m,k,n", PRODUCT_SHAPES)
def test_linear_by_jobs_is_the_same_on_any_thread_count(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    x, W = torch.randn(2, m // 2, k, generator=g), torch.randn(n, k, generator=g)
    before = torch.get_num_threads()
    got = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            got.append(threads.linear(x, W))
    finally:
        torch.set_num_threads(before)
    assert got[0].shape == (2, m // 2, n)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
    ref = torch.nn.functional.linear(x.double(), W.double())
    assert float((got[0] - ref).abs().max() / ref.abs().max()) < 1e-5


# (tokens, n, m) where aᵀb [n, m] over the tokens differs on 1 and 2 torch threads here
GRAM_SHAPES = [(2048, 64, 640), (4608, 640, 64), (8192, 16, 64)]


@pytest.mark.parametrize("t,n,m", GRAM_SHAPES)
def test_gram_by_jobs_accumulates_in_place_the_same_on_any_thread_count(t, n, m):
    g = torch.Generator().manual_seed(t + n + m)
    a1, a2 = torch.randn(t, n, generator=g), torch.randn(t, n, generator=g)
    b1, b2 = torch.randn(t, m, generator=g), torch.randn(t, m, generator=g)
    before = torch.get_num_threads()
    got = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            acc = threads.add_gram(None, a1, b1)
            same = threads.add_gram(acc, a2, b2)
            assert same is acc  # in place
            got.append(acc)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
    ref = a1.double().T @ b1.double() + a2.double().T @ b2.double()
    assert float((got[0] - ref).abs().max() / ref.abs().max()) < 1e-5
