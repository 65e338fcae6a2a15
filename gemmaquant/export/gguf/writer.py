"""Write a Gemma checkpoint as a GGUF file identical to `convert_hf_to_gguf.py --outtype bf16` followed
by `llama-quantize <preset>` (docs/gguf-gemma.md §1, §4, §7), streaming one tensor at a time.

What the reference pipeline does to each tensor, and so do we:
* 2-D weights: the converter stores them as BF16 (an f32/f16 source is rounded to bf16 here), and
  llama-quantize widens that to f32 exactly and quantizes (or copies, for BF16). So we quantize
  f32(bf16(w)) with the planned type.
* Norms: f32(w) + 1 (HF computes x*(1+w), llama.cpp x*w), stored F32; an f16 source adds 1 in f16.

Memory: the header (keys + tensor infos, `header.py`) is packed by `gguf.GGUFWriter`, as the converter's
is, in a background process while the first slabs are quantized. Tensor data is streamed by us in row
slabs from the mmap'd safetensors
(GGUFWriter.write_tensors_to_file wants every array alive at once), so peak RSS is a slab plus
the quantizer's temporaries. The file goes to a temporary name, is read back with our validating reader
(`formats.gguf.GGUFFile`) and checked key by key and tensor by tensor (type, shape, CRC-32 of the bytes,
`verify.py`), then renamed into place.

Several presets of one model (`write_gguf_set`) are written in the same single pass: each source slab is
read and converted once and quantized once per distinct type the outputs give that tensor, and each
result is written into every file that takes it; one header process builds all the headers from one
reading of the vocabulary. Each file's bytes are those `write_gguf` writes alone (it is the same code
with one output), and every file is all-or-nothing: on any failure or Ctrl-C all temporaries go.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...formats.checkpoint import Checkpoint
from ...errors import GemmaQuantError
from ..atomic import atomic_output
from ..guard import check_output
from ...numerics.ggml.types import GGMLType, row_bytes
from ...formats.safetensors import ITEMSIZE, release_pages
from ...schemes import Scheme
from .header import ALIGNMENT, HeaderJob, HeaderSpec
from ...formats.config import FULL
from ...formats.gguf.names import ROPE_FREQS
from .plan import TensorPlan, fallback_count, plan_types, preset
from .preset_rules import requires_imatrix
from .verify import verify_file
from .workers import Slab, TensorWork, quantize_rows, run_ordered

SLAB_VALUES = 1 << 22  # rows per write: ~16 MB of f32 source at a time
_NO_IMATRIX = (GGMLType.Q8_0, GGMLType.F16)  # types whose quantizer ignores importance weights
# Until the header arrives from its process, finished slabs wait in memory, up to this many bytes;
# then the writer waits for it. The bound is far above what a real vocabulary's header takes to arrive
# (benchmarks/RESULTS.md §8), so the wait only happens when that process is starved.
HEADER_WAIT_BYTES = 512 << 20


@dataclass
class Report:
    path: Path
    scheme: str
    plans: list[TensorPlan]
    n_fallback: int
    file_bytes: int
    n_keys: int
    seconds: float
    crc32: dict[str, int] = field(default_factory=dict)  # tensor name -> CRC-32 of its bytes
    imatrix_used: list[str] = field(default_factory=list)  # tensors whose bytes used importance weights
    imatrix_missing: list[str] = field(default_factory=list)  # tensors it would weight but has no entry for

    @property
    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.plans:
            out[p.type.name] = out.get(p.type.name, 0) + 1
        return out


def _imatrix_vector(p: TensorPlan, imatrix: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
    """The per-column importance llama-quantize would pass for this tensor, or None.

    It looks entries up only for tensors it converts (target != the BF16 source), uses one of
    exactly n_per_row values (MoE experts: n_per_row per expert), ignores a wrong-sized token
    embedding entry and aborts on any other."""
    if imatrix is None or p.type in (GGMLType.F32, GGMLType.BF16) or p.name not in imatrix:
        return None
    v = imatrix[p.name].detach().to(torch.float32).reshape(-1)
    n_mat = p.shape[0] if len(p.shape) == 3 else 1
    if v.numel() != p.n_per_row * n_mat:
        if p.name in ("token_embd.weight", "per_layer_token_embd.weight"):
            return None
        per = f" × {n_mat} experts" if n_mat > 1 else ""
        raise GemmaQuantError(f"imatrix entry '{p.name}' has {v.numel()} values; the tensor has "
                              f"{p.n_per_row} columns{per} (was the imatrix computed on another model?)")
    if not torch.isfinite(v).all():
        raise GemmaQuantError(f"imatrix entry '{p.name}' contains non-finite values")
    return v


def imatrix_coverage(plans: list[TensorPlan], imatrix: dict, where: str) -> list[str]:
    """The tensors llama-quantize would weight with the imatrix but that it has no entry for
    (token_embd never has one: llama-imatrix does not see it). An imatrix that matches no tensor
    at all is an error: the output would equal a run without it."""
    names = {p.name for p in plans}
    if imatrix and not any(n in names for n in imatrix):
        theirs = sorted(imatrix)[0]
        ours = next((p.name for p in plans if p.name.startswith("blk.")), plans[0].name)
        raise GemmaQuantError(f"{where}: none of its {len(imatrix)} entries names a tensor of this model (it has "
                              f"'{theirs}', the model '{ours}'); an imatrix of another model?")
    return [p.name for p in plans if p.type not in (GGMLType.F32, GGMLType.BF16, *_NO_IMATRIX)
            and p.name not in ("token_embd.weight", "per_layer_token_embd.weight") and p.name not in imatrix]


def _tensor_slabs(ckpt: Checkpoint, i: int, w: TensorWork):
    """Yield (source view, job, slab) per slab of rows in file order: `job` returns the slab's GGUF
    bytes here, a numpy uint8 array per target of `w`; `slab` (or None) names the same work for a worker
    process (`workers.Slab`), given to the searches only. Jobs are independent: they may run concurrently."""
    p = w.plan
    if p.name == ROPE_FREQS:  # Gemma 4: made by the converter, not read from the checkpoint
        data = rope_freqs(ckpt.config)
        yield data, lambda: (data.numpy().view(np.uint8),), None
        return
    src = ckpt.tensor(p.hf_name)
    if tuple(src.shape) != p.shape:
        raise GemmaQuantError(f"{ckpt.path}: tensor '{p.hf_name}' has shape {list(src.shape)}, "
                              f"expected {list(p.shape)}")
    if src.dim() == 1:
        def norm_job():
            if p.norm and src.dtype == torch.float16:
                x = (src + 1).float()  # the converter keeps f16 tensors f16 and adds 1 there
            else:
                x = src.float() + 1.0 if p.norm else src.float()
            return (x.contiguous().numpy().view(np.uint8),)
        yield src, norm_job, None
        return
    n = p.n_per_row
    src = src.reshape(-1, n)  # experts [E, rows, n]: quantized row by row over all experts
    rows = src.shape[0]
    per = p.shape[-2] if len(p.shape) == 3 else rows  # slabs stop at expert boundaries (own importance)
    step = max(1, SLAB_VALUES // n)
    for r in (r for e0 in range(0, rows, per) for r in range(e0, e0 + per, step)):
        end = min(r + step, (r // per + 1) * per)
        view = src[r:end]  # no page is read here: a worker process reads its own mapping
        slab = Slab(i, r, end) if w.searched else None
        yield view, partial(quantize_rows, ckpt.path, w, view, r), slab


def rope_freqs(cfg) -> torch.Tensor:
    """Gemma 4's full-layer RoPE frequency factors as the converter makes them: 1 for the rotated
    pairs, 1e30 (frequency ~0: the pair stays put) for the rest of the head's half."""
    half = cfg.head_dim_of_kind(FULL) // 2
    n = int(cfg.head_dim_of_kind(FULL) * cfg.rope_partial_factor / 2)
    return torch.tensor([1.0] * n + [1e30] * (half - n), dtype=torch.float32)


def _pad(fout, n: int) -> None:
    fout.write(b"\0" * (-n % ALIGNMENT))




@dataclass
class GGUFOutput:
    """One file of a write: its preset and path, and what only it has. `imatrix`: GGUF tensor name ->
    per-column importance (`formats.gguf.imatrix.read_imatrix`); `imatrix_meta`: {file, dataset,
    entries_count, chunks_count} for the `quantize.imatrix.*` keys; `plans`: per-tensor types other than
    the preset's (a size-budgeted mix, same tensors and order); `extra_kv`: gemmaquant's own metadata keys
    (`metadata.finish_like_llama_quantize`)."""
    scheme: str | Scheme
    path: str | Path
    imatrix: dict[str, torch.Tensor] | None = None
    imatrix_meta: dict | None = None
    plans: list[TensorPlan] | None = None
    extra_kv: dict | None = None


@dataclass
class _Prepared:
    scheme: Scheme
    path: Path
    plans: list[TensorPlan]
    qws: dict[str, torch.Tensor | None]
    imatrix_meta: dict | None
    missing: list[str]
    extra_kv: dict | None

    @property
    def spec(self) -> HeaderSpec:
        return HeaderSpec(self.scheme, self.plans, self.imatrix_meta, self.extra_kv)


def _prepare(ckpt: Checkpoint, o: GGUFOutput, force: bool, inputs: list) -> _Prepared:
    """The output guard, the plan and the imatrix refusals of one output, before any work."""
    s = preset(o.scheme)
    path = Path(o.path)
    check_output(path, force=force, kind="file", inputs=inputs)
    preset_plans = plan_types(ckpt.config, s, o.imatrix is not None, has_lm_head="lm_head.weight" in ckpt.names())
    plans = preset_plans if o.plans is None else o.plans
    if [(p.name, p.shape) for p in plans] != [(p.name, p.shape) for p in preset_plans]:
        raise GemmaQuantError(f"{path}: the given plan names other tensors than the model has (internal error)")
    meta = o.imatrix_meta
    if o.imatrix is not None and meta is None:
        meta = {"entries_count": len(o.imatrix)}
    missing = [] if o.imatrix is None else imatrix_coverage(plans, o.imatrix, (meta or {}).get("file") or "imatrix")
    low = next((p for p in plans if p.name in missing and requires_imatrix(s.name, p.name, p.type)), None)
    if low is not None:  # llama-quantize stops on it half-way through the file; we refuse before writing
        raise GemmaQuantError(f"{(meta or {}).get('file') or 'imatrix'}: missing importance matrix for tensor "
                              f"'{low.name}' in a very low-bit quantization ({s.name} makes it {low.type.name})")
    qws = {p.name: _imatrix_vector(p, o.imatrix) for p in plans}
    return _Prepared(s, path, plans, qws, meta, missing, o.extra_kv)


def _same_importance(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


def _tensor_work(outs: list[_Prepared]) -> tuple[list[TensorWork], list[list[int]]]:
    """Per tensor: the distinct (type, importance) targets the outputs want, and per output the index
    of its target. Two presets that give a tensor the same type (with the same importance) share it."""
    work, index = [], []
    for i, p0 in enumerate(outs[0].plans):
        targets: list[tuple[GGMLType, torch.Tensor | None]] = []
        idx = []
        for o in outs:
            p = o.plans[i]
            if (p.name, p.hf_name, p.shape, p.norm) != (p0.name, p0.hf_name, p0.shape, p0.norm):
                raise GemmaQuantError(f"{o.path}: tensor {i} is '{p.name}', not '{p0.name}' (internal error)")
            qw = o.qws[p.name]
            j = next((j for j, (t, q) in enumerate(targets) if t == p.type and _same_importance(q, qw)), None)
            if j is None:
                j = len(targets)
                targets.append((p.type, qw))
            idx.append(j)
        if len(p0.shape) == 1 and len(targets) > 1:  # 1-D tensors are converted, never quantized
            raise GemmaQuantError(f"tensor '{p0.name}': 1-D, yet planned as several types (internal error)")
        work.append(TensorWork(p0, tuple(targets)))
        index.append(idx)
    return work, index


class _SetWriter:
    """Writes each output's header and then the slabs in file order, every slab's target bytes into
    each file that takes them, padding each tensor to ALIGNMENT and keeping its CRC-32 (computed once
    per target). Slabs that finish before the headers are built wait in memory (up to
    HEADER_WAIT_BYTES; then it waits for the headers), so the workers never idle on them."""

    def __init__(self, fouts, outs: list[_Prepared], index: list[list[int]], header: HeaderJob, total: int,
                 progress):
        self.fouts, self.outs, self.index, self.header = fouts, outs, index, header
        self.total, self.progress = total, progress
        self.kvs: list[dict] | None = None
        self.crcs: list[dict[str, int]] = [{} for _ in outs]
        self.waiting: list = []
        self.waiting_bytes = 0
        self.current, self.crc, self.n, self.done = -1, [], [], 0

    def add(self, i: int, view: torch.Tensor, chunks: tuple[np.ndarray, ...]) -> None:
        if self.kvs is not None:
            self._put(i, view, chunks)
            return
        self.waiting.append((i, view, chunks))
        self.waiting_bytes += sum(c.nbytes for c in chunks)
        if self.header.ready() or self.waiting_bytes >= HEADER_WAIT_BYTES:
            self._write_headers()

    def finish(self) -> tuple[list[dict], list[dict[str, int]]]:
        if self.kvs is None:
            self._write_headers()
        if self.current >= 0:
            self._end_tensor()
        return self.kvs, self.crcs

    def _write_headers(self) -> None:
        self.kvs = []
        for k, fout in enumerate(self.fouts):
            head, kv = self.header.result(k)
            fout.write(head)
            self.kvs.append(kv)
        for w in self.waiting:
            self._put(*w)
        self.waiting.clear()

    def _put(self, i: int, view: torch.Tensor, chunks: tuple[np.ndarray, ...]) -> None:
        if i != self.current:
            if self.current >= 0:
                self._end_tensor()
            self.current, self.crc, self.n = i, [0] * len(chunks), [0] * len(chunks)
        bufs = [memoryview(np.ascontiguousarray(c)).cast("B") for c in chunks]
        for fout, j in zip(self.fouts, self.index[i]):
            fout.write(bufs[j])
        for j, buf in enumerate(bufs):
            self.crc[j] = zlib.crc32(buf, self.crc[j])
            self.n[j] += len(buf)
        release_pages(view)  # once written, the slab's source pages leave RSS (a BF16 slab IS the view)
        self.done += view.numel() * view.element_size()
        if self.progress:
            self.progress(self.done, self.total, self.outs[0].plans[i].name)

    def _end_tensor(self) -> None:
        for k, (fout, j) in enumerate(zip(self.fouts, self.index[self.current])):
            p = self.outs[k].plans[self.current]
            want = p.numel // p.n_per_row * row_bytes(p.type, p.n_per_row)
            if self.n[j] != want:
                raise GemmaQuantError(f"tensor '{p.name}': wrote {self.n[j]} bytes, expected {want} (internal error)")
            self.crcs[k][p.name] = self.crc[j]
            _pad(fout, self.n[j])


def write_gguf(ckpt: Checkpoint, scheme: str | Scheme, out_path: str | Path, *,
               imatrix: dict[str, torch.Tensor] | None = None, imatrix_meta: dict | None = None,
               force: bool = False, workers: int | None = None, header: HeaderJob | None = None,
               progress: Callable[[int, int, str], None] | None = None, inputs=(),
               plans: list[TensorPlan] | None = None, extra_kv: dict | None = None) -> Report:
    """Write `ckpt` as a GGUF `scheme` file at `out_path` (see the module doc; the arguments as
    GGUFOutput's and write_gguf_set's)."""
    return write_gguf_set(ckpt, [GGUFOutput(scheme, out_path, imatrix, imatrix_meta, plans, extra_kv)],
                          force=force, workers=workers, header=header, progress=progress, inputs=inputs)[0]


def write_gguf_set(ckpt: Checkpoint, outputs: list[GGUFOutput], *, force: bool = False, workers: int | None = None,
                   header: HeaderJob | None = None, progress: Callable[[int, int, str], None] | None = None,
                   inputs=()) -> list[Report]:
    """Write one GGUF per output in a single pass over the checkpoint (see the module doc).

    Every output passes the output guard and its imatrix refusals before any work. `progress(done,
    total, tensor)` is called after each slab is written (source bytes, each counted once). `workers`:
    quantizing workers (default: torch's thread count); the bytes do not depend on it. `header`: a
    `HeaderJob` already started for these outputs (`header.start_header`), e.g. before torch was
    imported; by default one is started here (in a background process for a real vocabulary).
    `inputs`: files read besides the checkpoint (imatrix, calibration text), which no output may
    replace (export/guard.py)."""
    t0 = time.perf_counter()
    inputs = [ckpt.path, *inputs]
    if not outputs:
        raise GemmaQuantError("no GGUF output to write (internal error)")
    outs = [_prepare(ckpt, o, force, inputs) for o in outputs]
    paths = [o.path.absolute() for o in outs]
    if len(set(paths)) != len(paths):
        raise GemmaQuantError(f"{next(p for p in paths if paths.count(p) > 1)}: the same output twice (internal error)")
    work, index = _tensor_work(outs)
    specs = [o.spec for o in outs]
    if header is None:
        header = HeaderJob.of_set(ckpt.path, ckpt.config, specs)
    elif [(h.scheme.name, h.plans, h.imatrix_meta) for h in header.specs] != \
            [(h.scheme.name, h.plans, h.imatrix_meta) for h in specs]:
        header.close()
        raise GemmaQuantError(f"{outs[0].path}: the header job was started for another scheme, plan or imatrix "
                              "(internal error)")
    n_workers = workers or torch.get_num_threads()
    plans = outs[0].plans
    total = sum(p.numel * (ITEMSIZE[ckpt.dtype_name(p.hf_name)] if p.hf_name else 4) for p in plans)
    try:
        with ExitStack() as outputs_stack:  # on any exception every temporary is removed
            tmps = [outputs_stack.enter_context(atomic_output(o.path, force=force, kind="file", inputs=inputs))
                    for o in outs]
            with ExitStack() as files:
                fouts = [files.enter_context(open(t, "wb")) for t in tmps]
                jobs = (((i, view), job, slab) for i, w in enumerate(work)
                        for view, job, slab in _tensor_slabs(ckpt, i, w))
                out = _SetWriter(fouts, outs, index, header, total, progress)
                for (i, view), chunks in run_ordered(jobs, n_workers, (ckpt.path, work)):
                    out.add(i, view, chunks)
                kvs, crcs = out.finish()
            n_keys = [verify_file(t, kv, o.plans, c) for t, kv, o, c in zip(tmps, kvs, outs, crcs)]
            sizes = [t.stat().st_size for t in tmps]
    finally:
        header.close()
    seconds = time.perf_counter() - t0
    return [Report(o.path, o.scheme.name, o.plans, fallback_count(o.plans), size, nk, seconds, c,
                   [p.name for p in o.plans if o.qws[p.name] is not None and p.type not in _NO_IMATRIX], o.missing)
            for o, size, nk, c in zip(outs, sizes, n_keys, crcs)]
