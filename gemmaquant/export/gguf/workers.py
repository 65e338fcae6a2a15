"""Run the writer's slab jobs concurrently and hand the results back in file order.

The K-quant and 4/5-bit searches are chains of thousands of ~1 MB torch ops per slab. Two threads in
one process doing that share the GIL for every op's dispatch, so threads scale worse than processes
(benchmarks/RESULTS.md, GGUF writer). So on Linux those slabs go to forked worker processes (no second torch
import: they start as copies of this one), each opening its own read-only mapping of the checkpoint
and returning the slab's bytes. Cheap conversions (F32/F16/BF16 copies, Q8_0) stay on threads in
this process: moving their bytes through a pipe would cost more than computing them. Elsewhere
(no fork), everything runs on threads.

Each worker computes with one torch thread: with torch's own 2-thread ops every ~1 MB op ends in a
barrier, and on a busy machine a descheduled partner stalls the whole op.
Workers ignore SIGINT; Ctrl-C reaches this process, which stops them (running slabs finish, < 1 s).
They are forked inside `procs.signals_deferred`: a Ctrl-C during a fork used to be swallowed.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import GemmaQuantError
from ...numerics.ggml import compiled_quantize
from ...numerics.ggml.quantize import quantize
from ...numerics.ggml.types import GGMLType
from ..procs import child_signals, die_with_parent, signals_deferred
from ...formats.safetensors import release_pages
from .plan import TensorPlan

CHEAP = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0)  # conversions, not searches
_STATE: dict = {}  # in a worker process: its checkpoint and the writer's TensorWork list


@dataclass(frozen=True)
class TensorWork:
    """What the writer makes of one source tensor: `plan` names it and its conversion (the plan of the
    first output; every output's plan of it differs in type only) and `targets` the distinct
    (type, importance vector) pairs the outputs want, each quantized once per slab."""
    plan: TensorPlan
    targets: tuple[tuple[GGMLType, torch.Tensor | None], ...]

    @property
    def searched(self) -> bool:
        return any(t not in CHEAP for t, _ in self.targets)


@dataclass(frozen=True)
class Slab:
    """Rows [r0, r1) of work[i], quantized from the worker's own mapping of the checkpoint."""
    i: int
    r0: int
    r1: int


def convert_rows(where: Path, p: TensorPlan, view: torch.Tensor, f32: bool) -> torch.Tensor:
    """A slab of rows of a 2-D weight as the quantizers take it: bf16 (the converter's intermediate),
    or f32 for the tensors the converter writes F32 (Gemma 4's expert router)."""
    x = view.float() if f32 else view.to(torch.bfloat16)
    if not torch.isfinite(x).all():
        raise GemmaQuantError(f"{where}: tensor '{p.hf_name}' contains NaN/inf values")
    return x


def quantize_rows(where: Path, w: TensorWork, view: torch.Tensor, r0: int) -> tuple[np.ndarray, ...]:
    """A slab of rows as GGUF bytes, one array per target type: the source rows are read and converted
    once, then quantized to each type (a set of presets shares the slab)."""
    x: dict[bool, torch.Tensor] = {}
    out = []
    for t, qw in w.targets:
        f32 = t == GGMLType.F32
        if f32 not in x:
            x[f32] = convert_rows(where, w.plan, view, f32)
        out.append(quantize(x[f32], t, row_importance(w.plan, qw, r0)).numpy())
    return tuple(out)


def row_importance(p: TensorPlan, qw: torch.Tensor | None, r0: int) -> torch.Tensor | None:
    """The importance vector of the slab starting at row r0: for MoE experts (3-D, one vector per
    expert, as llama-quantize slices it: row r uses expert r // rows_per_expert) that expert's; slabs of
    an expert tensor never cross an expert boundary."""
    if qw is None or qw.numel() == p.n_per_row:
        return qw
    return qw.view(-1, p.n_per_row)[r0 // p.shape[-2]]


def _init_worker(path: Path, work: list[TensorWork]) -> None:
    die_with_parent()  # a SIGKILLed parent (OOM killer) must not leave workers waiting forever
    child_signals()  # forked inside signals_deferred: SIGINT ignored, then signals unblocked
    torch.set_num_threads(1)
    from ...formats.checkpoint import Checkpoint

    _STATE.update(ckpt=Checkpoint(path), work=work)


def _run_slab(s: Slab) -> tuple[np.ndarray, ...]:
    ckpt, w = _STATE["ckpt"], _STATE["work"][s.i]
    view = ckpt.tensor(w.plan.hf_name).reshape(-1, w.plan.n_per_row)[s.r0:s.r1]
    out = quantize_rows(ckpt.path, w, view, s.r0)
    release_pages(view)
    return out


def processes_available() -> bool:
    """Linux with fork, unless GEMMAQUANT_GGUF_WORKERS=threads (for side-by-side measurements)."""
    if os.environ.get("GEMMAQUANT_GGUF_WORKERS", "") == "threads":
        return False
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def run_ordered(jobs, workers: int, proc_init: tuple | None = None):
    """Run (tag, job, slab) triples, yielding (tag, result) in submission order.

    `job` is a callable; `slab` (a Slab or None) says the same work can run in a worker process,
    which happens when `proc_init` = (checkpoint dir, [TensorWork]) is given, there
    are several workers and the platform forks. At most 2 x workers slabs are in flight or
    done-but-unconsumed: a few slabs' temporaries and outputs."""
    if workers <= 1:
        for tag, job, _ in jobs:
            yield tag, job()
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    threads = ThreadPoolExecutor(workers, thread_name_prefix="gguf-quant")
    procs: Executor | None = None
    pending: deque = deque()
    try:
        for tag, job, slab in jobs:
            if slab is not None and proc_init is not None and processes_available():
                # submit() is where the pool forks (all its workers at the first one, with fork):
                # a signal landing during a fork must not be lost (procs.signals_deferred)
                if procs is None:
                    compiled_quantize.prepare()  # the workers inherit the native library (or its absence)
                with signals_deferred():
                    if procs is None:
                        procs = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                                    initializer=_init_worker, initargs=proc_init)
                    pending.append((tag, procs.submit(_run_slab, slab)))
            else:
                pending.append((tag, threads.submit(job)))
            while len(pending) > 2 * workers:
                t, f = pending.popleft()
                yield t, f.result()
        while pending:
            t, f = pending.popleft()
            yield t, f.result()
    finally:
        # Ctrl-C or an error: running slabs finish (< 1 s), queued ones are dropped
        threads.shutdown(wait=True, cancel_futures=True)
        if procs is not None:
            procs.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(before)
