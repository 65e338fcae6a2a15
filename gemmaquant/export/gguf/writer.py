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
(`formats.gguf.GGUFFile`) and checked key by key and tensor by tensor (type, shape, CRC-32 of the bytes), then renamed into place.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from ...formats.checkpoint import Checkpoint
from ...formats.gguf.reader import GGUFFile
from ...errors import GemmaQuantError
from ..atomic import atomic_output
from ..guard import check_output
from ...numerics.ggml.types import GGMLType, row_bytes
from ...formats.safetensors import ITEMSIZE, release_pages
from ...schemes import Scheme
from .header import ALIGNMENT, HeaderJob
from ...formats.config import FULL
from ...formats.gguf.names import ROPE_FREQS
from .plan import TensorPlan, fallback_count, plan_types, preset
from .preset_rules import requires_imatrix
from .workers import row_importance, CHEAP, Slab, quantize_rows, run_ordered

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


def _tensor_slabs(ckpt: Checkpoint, i: int, p: TensorPlan, qw: torch.Tensor | None):
    """Yield (source view, job, slab) per slab of rows in file order: `job` returns the slab's GGUF
    bytes as a numpy uint8 array here; `slab` (or None) names the same work for a worker process
    (`workers.Slab`), given to the searches only. Jobs are independent: they may run concurrently."""
    if p.name == ROPE_FREQS:  # Gemma 4: made by the converter, not read from the checkpoint
        data = rope_freqs(ckpt.config)
        yield data, lambda: data.numpy().view(np.uint8), None
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
            return x.contiguous().numpy().view(np.uint8)
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
        slab = None if p.type in CHEAP else Slab(i, r, end)
        yield view, partial(quantize_rows, ckpt.path, p, view, row_importance(p, qw, r)), slab


def rope_freqs(cfg) -> torch.Tensor:
    """Gemma 4's full-layer RoPE frequency factors as the converter makes them: 1 for the rotated
    pairs, 1e30 (frequency ~0: the pair stays put) for the rest of the head's half."""
    half = cfg.head_dim_of_kind(FULL) // 2
    n = int(cfg.head_dim_of_kind(FULL) * cfg.rope_partial_factor / 2)
    return torch.tensor([1.0] * n + [1e30] * (half - n), dtype=torch.float32)


def _same_value(want: gguf.GGUFValue, got, got_type: tuple[int, int | None]) -> bool:
    """Does a value read back by `GGUFFile` (strings decoded, numeric arrays as numpy) equal the
    writer-side `GGUFValue`, type included? Numbers compare after the cast the writer applies."""
    t = gguf.GGUFValueType
    if want.type == t.ARRAY:
        sub = want.sub_type or t.get_type(want.value[0])
        if got_type != (int(t.ARRAY), int(sub)):
            return False
        if sub == t.STRING:
            return got == [x.decode("utf-8") if isinstance(x, bytes) else x for x in want.value]
        if sub == t.BOOL:
            return [bool(x) for x in got] == [bool(x) for x in want.value]
        return np.array_equal(np.asarray(want.value).astype(_NP[sub]), got)
    if got_type != (int(want.type), None):
        return False
    if want.type == t.STRING:
        v = want.value
        return got == (v.decode("utf-8") if isinstance(v, bytes) else v)
    if want.type == t.BOOL:
        return bool(got) == bool(want.value)
    return np.array([want.value]).astype(_NP[want.type])[0] == np.array([got]).astype(_NP[want.type])[0]


_NP = {gguf.GGUFValueType.UINT8: np.uint8, gguf.GGUFValueType.INT8: np.int8,
       gguf.GGUFValueType.UINT16: np.uint16, gguf.GGUFValueType.INT16: np.int16,
       gguf.GGUFValueType.UINT32: np.uint32, gguf.GGUFValueType.INT32: np.int32,
       gguf.GGUFValueType.FLOAT32: np.float32, gguf.GGUFValueType.UINT64: np.uint64,
       gguf.GGUFValueType.INT64: np.int64, gguf.GGUFValueType.FLOAT64: np.float64}


def verify_file(path: Path, kv: dict[str, gguf.GGUFValue], plans: list[TensorPlan],
                crc32: dict[str, int]) -> int:
    """Re-read `path` and check it holds exactly the intended keys (order, types, values) and
    tensors (order, type, shape, bytes). Returns the number of keys checked.

    Reads with our validating `GGUFFile` (tests check it against `gguf.GGUFReader` on the files we
    write): GGUFReader makes numpy objects for each of the 262k vocabulary strings, which made the
    check cost as much as half of llama.cpp's whole convert + quantize (benchmarks/RESULTS.md §2, §4)."""
    r = GGUFFile(path)
    try:
        if list(r.metadata) != list(kv):
            raise GemmaQuantError(f"{path}: written keys differ from the intended ones (internal error)")
        for k, want in kv.items():
            if not _same_value(want, r.metadata[k], r.types[k]):
                raise GemmaQuantError(f"{path}: key '{k}' reads back differently (internal error)")
        if list(r.tensors) != [p.name for p in plans]:
            raise GemmaQuantError(f"{path}: written tensors differ from the plan (internal error)")
        for t, p in zip(r.tensors.values(), plans):
            if int(t.qtype) != int(p.type) or t.shape != tuple(p.shape):
                raise GemmaQuantError(f"{path}: tensor '{p.name}' reads back as {t.qtype.name} "
                                      f"{list(t.shape)} (internal error)")
            if _file_crc32(path, t.offset, t.nbytes) != crc32[p.name]:
                raise GemmaQuantError(f"{path}: tensor '{p.name}' bytes read back differently (internal error)")
    finally:
        r.close()
    return len(kv)


def _file_crc32(path: Path, offset: int, n: int, chunk: int = 1 << 26) -> int:
    """CRC-32 of bytes [offset, offset+n) read with read() calls: pages read through the reader's
    memmap would count in RSS, up to the whole output file. CRC-32 (zlib) rather than sha256: about
    twice as fast (benchmarks/RESULTS.md §2), and it checks our own write, nobody forges it."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while n > 0:
            b = f.read(min(n, chunk))
            if not b:
                break
            crc = zlib.crc32(b, crc)
            n -= len(b)
    return crc


def _pad(fout, n: int) -> None:
    fout.write(b"\0" * (-n % ALIGNMENT))


class _DataWriter:
    """Writes the header and then the slabs in file order, padding each tensor to ALIGNMENT and
    keeping its CRC-32. Slabs that finish before the header is built wait in memory (up to
    HEADER_WAIT_BYTES; then it waits for the header), so the workers never idle on it."""

    def __init__(self, fout, plans: list[TensorPlan], header: HeaderJob, total: int, progress):
        self.fout, self.plans, self.header, self.total, self.progress = fout, plans, header, total, progress
        self.kv: dict | None = None
        self.crcs: dict[str, int] = {}
        self.waiting: list = []
        self.waiting_bytes = 0
        self.current, self.crc, self.n, self.done = -1, 0, 0, 0

    def add(self, i: int, view: torch.Tensor, chunk: np.ndarray) -> None:
        if self.kv is not None:
            self._put(i, view, chunk)
            return
        self.waiting.append((i, view, chunk))
        self.waiting_bytes += chunk.nbytes
        if self.header.ready() or self.waiting_bytes >= HEADER_WAIT_BYTES:
            self._write_header()

    def finish(self) -> tuple[dict, dict[str, int]]:
        if self.kv is None:
            self._write_header()
        if self.current >= 0:
            self._end_tensor()
        return self.kv, self.crcs

    def _write_header(self) -> None:
        head, self.kv = self.header.result()
        self.fout.write(head)
        for w in self.waiting:
            self._put(*w)
        self.waiting.clear()

    def _put(self, i: int, view: torch.Tensor, chunk: np.ndarray) -> None:
        if i != self.current:
            if self.current >= 0:
                self._end_tensor()
            self.current, self.crc, self.n = i, 0, 0
        buf = memoryview(np.ascontiguousarray(chunk)).cast("B")
        self.fout.write(buf)
        self.crc = zlib.crc32(buf, self.crc)
        self.n += len(buf)
        release_pages(view)  # once written, the slab's source pages leave RSS (a BF16 slab IS the view)
        self.done += view.numel() * view.element_size()
        if self.progress:
            self.progress(self.done, self.total, self.plans[i].name)

    def _end_tensor(self) -> None:
        p = self.plans[self.current]
        want = p.numel // p.n_per_row * row_bytes(p.type, p.n_per_row)
        if self.n != want:
            raise GemmaQuantError(f"tensor '{p.name}': wrote {self.n} bytes, expected {want} (internal error)")
        self.crcs[p.name] = self.crc
        _pad(self.fout, self.n)


def write_gguf(ckpt: Checkpoint, scheme: str | Scheme, out_path: str | Path, *,
               imatrix: dict[str, torch.Tensor] | None = None, imatrix_meta: dict | None = None,
               force: bool = False, workers: int | None = None, header: HeaderJob | None = None,
               progress: Callable[[int, int, str], None] | None = None, inputs=(),
               plans: list[TensorPlan] | None = None, extra_kv: dict | None = None) -> Report:
    """Write `ckpt` as a GGUF `scheme` file at `out_path` (see the module doc).

    `imatrix`: GGUF tensor name -> per-column importance (`formats.gguf.imatrix.read_imatrix`);
    `imatrix_meta`: {file, dataset, entries_count, chunks_count} for the `quantize.imatrix.*` keys.
    `progress(done, total, tensor)` is called after each slab is written (source bytes). `workers`: quantizing threads
    (default: torch's thread count); the bytes do not depend on it. `header`: a `HeaderJob` already
    started for this output (`header.start_header`), e.g. before torch was imported; by default one
    is started here (in a background process for a real vocabulary). `inputs`: files read besides the
    checkpoint (imatrix, calibration text), which the output must not replace (export/guard.py).
    `plans`: per-tensor types other than the preset's (a size-budgeted mix, same tensors and order);
    `extra_kv`: gemmaquant's own metadata keys (`metadata.finish_like_llama_quantize`)."""
    t0 = time.perf_counter()
    s = preset(scheme)
    out_path = Path(out_path)
    inputs = [ckpt.path, *inputs]
    check_output(out_path, force=force, kind="file", inputs=inputs)
    preset_plans = plan_types(ckpt.config, s, imatrix is not None, has_lm_head="lm_head.weight" in ckpt.names())
    if plans is None:
        plans = preset_plans
    elif [(p.name, p.shape) for p in plans] != [(p.name, p.shape) for p in preset_plans]:
        raise GemmaQuantError(f"{out_path}: the given plan names other tensors than the model has (internal error)")
    if imatrix is not None and imatrix_meta is None:
        imatrix_meta = {"entries_count": len(imatrix)}
    missing = [] if imatrix is None else imatrix_coverage(plans, imatrix, (imatrix_meta or {}).get("file") or "imatrix")
    low = next((p for p in plans if p.name in missing and requires_imatrix(s.name, p.name, p.type)), None)
    if low is not None:  # llama-quantize stops on it half-way through the file; we refuse before writing
        raise GemmaQuantError(f"{(imatrix_meta or {}).get('file') or 'imatrix'}: missing importance matrix for tensor "
                              f"'{low.name}' in a very low-bit quantization ({s.name} makes it {low.type.name})")
    qws = {p.name: _imatrix_vector(p, imatrix) for p in plans}
    n_workers = workers or torch.get_num_threads()
    if header is None:
        header = HeaderJob(ckpt.path, ckpt.config, s, plans, imatrix_meta, extra_kv=extra_kv)
    elif header.scheme.name != s.name or header.plans != plans or header.imatrix_meta != imatrix_meta:
        header.close()
        raise GemmaQuantError(f"{out_path}: the header job was started for another scheme, plan or imatrix "
                              "(internal error)")
    try:
        with atomic_output(out_path, force=force, kind="file", inputs=inputs) as tmp:
            jobs = (((i, view), job, slab) for i, p in enumerate(plans)
                    for view, job, slab in _tensor_slabs(ckpt, i, p, qws[p.name]))
            total = sum(p.numel * (ITEMSIZE[ckpt.dtype_name(p.hf_name)] if p.hf_name else 4) for p in plans)
            with open(tmp, "wb") as fout:
                out = _DataWriter(fout, plans, header, total, progress)
                for (i, view), chunk in run_ordered(jobs, n_workers, (ckpt.path, plans, qws)):
                    out.add(i, view, chunk)
                kv, crcs = out.finish()
            n_keys = verify_file(tmp, kv, plans, crcs)
            size = tmp.stat().st_size
    finally:
        header.close()
    return Report(out_path, s.name, plans, fallback_count(plans), size, n_keys,
                  time.perf_counter() - t0, crcs,
                  [p.name for p in plans if qws[p.name] is not None and p.type not in _NO_IMATRIX], missing)
