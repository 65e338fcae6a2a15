"""Write a Gemma checkpoint as a GGUF file identical to `convert_hf_to_gguf.py --outtype bf16` followed
by `llama-quantize <preset>` (docs/gguf-gemma.md §1, §4, §7.7), streaming one tensor at a time.

What the reference pipeline does to each tensor, and so do we:
* 2-D weights: the converter stores them as BF16 (an f32/f16 source is rounded to bf16 here), and
  llama-quantize widens that to f32 exactly and quantizes (or copies, for BF16). So we quantize
  f32(bf16(w)) with the planned type.
* Norms: f32(w) + 1 (HF computes x*(1+w), llama.cpp x*w), stored F32; an f16 source adds 1 in f16.

Memory: the header (keys + tensor infos) is written first with `gguf.GGUFWriter`, whose KV packing
is the converter's. Tensor data is then streamed by us in row slabs from the mmap'd safetensors
(GGUFWriter.write_tensors_to_file wants every array alive at once), so peak RSS is a slab plus
the quantizer's temporaries. The file goes to a temporary name, is read back with our validating reader
(`gguf_file.GGUFFile`) and checked key by key and tensor by tensor (type, shape, sha256 of the bytes), then renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..gguf_file import GGUFFile
from ..errors import GemmaQuantError
from ..export.atomic import atomic_output, check_output
from ..ggml.quantize import quantize
from ..ggml.types import GGMLType, row_bytes
from ..safetensors_io import release_pages
from ..schemes import Scheme
from .metadata import ARCH, add_model_kvs, finish_like_llama_quantize
from .plan import TensorPlan, fallback_count, plan_types, preset
from .vocab import add_vocab

ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT  # 32
SLAB_VALUES = 1 << 22  # rows per write: ~16 MB of f32 source at a time
_NO_IMATRIX = (GGMLType.Q8_0, GGMLType.F16)  # types whose quantizer ignores importance weights
CONVERT_FTYPE_BF16 = 32  # the converter's general.file_type; llama-quantize replaces it


@dataclass
class Report:
    path: Path
    scheme: str
    plans: list[TensorPlan]
    n_fallback: int
    file_bytes: int
    n_keys: int
    seconds: float
    sha256: dict[str, str] = field(default_factory=dict)  # tensor name -> sha256 of its bytes
    imatrix_used: list[str] = field(default_factory=list)  # tensors whose bytes used importance weights

    @property
    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.plans:
            out[p.type.name] = out.get(p.type.name, 0) + 1
        return out


def _imatrix_vector(p: TensorPlan, imatrix: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
    """The per-column importance llama-quantize would pass for this tensor, or None.

    It looks entries up only for tensors it converts (target != the BF16 source), uses one of
    exactly n_per_row values, ignores a wrong-sized token_embd entry and aborts on any other."""
    if imatrix is None or p.type in (GGMLType.F32, GGMLType.BF16) or p.name not in imatrix:
        return None
    v = imatrix[p.name].detach().to(torch.float32).reshape(-1)
    if v.numel() != p.n_per_row:
        if p.name == "token_embd.weight":
            return None
        raise GemmaQuantError(f"imatrix entry '{p.name}' has {v.numel()} values; the tensor has "
                              f"{p.n_per_row} columns (was the imatrix computed on another model?)")
    if not torch.isfinite(v).all():
        raise GemmaQuantError(f"imatrix entry '{p.name}' contains non-finite values")
    return v


def _tensor_slabs(ckpt: Checkpoint, p: TensorPlan, qw: torch.Tensor | None):
    """Yield (job, source view) per slab of rows in file order: each job is a callable returning the
    slab's GGUF bytes as a numpy uint8 array. Jobs are independent: workers may run them concurrently."""
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
        yield norm_job, src
        return
    rows, n = p.shape
    step = max(1, SLAB_VALUES // n)

    def slab_job(view: torch.Tensor):
        x = view.to(torch.bfloat16)  # the converter's BF16 intermediate
        if not torch.isfinite(x).all():
            raise GemmaQuantError(f"{ckpt.path}: tensor '{p.hf_name}' contains NaN/inf values")
        return quantize(x, p.type, qw).numpy()

    for r in range(0, rows, step):
        view = src[r:r + step]
        yield partial(slab_job, view), view


def _run_ordered(jobs, workers: int):
    """Run (tag, job) pairs on `workers` threads, yielding (tag, result) in submission order.

    Each torch op runs on one thread meanwhile (restored after): the quantizers are chains of
    ~1 MB ops, and with torch's own 2-thread ops every op ends in a barrier; on a busy machine a
    descheduled partner thread stalls it for a time slice (measured 30x slower under load), while
    independent slabs on single-threaded workers just share the CPU. At most 2 x workers slabs are
    in flight or done-but-unconsumed: a few slabs' temporaries and outputs."""
    if workers <= 1:
        for tag, job in jobs:
            yield tag, job()
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="gguf-quant")
    pending: deque = deque()
    try:
        for tag, job in jobs:
            pending.append((tag, pool.submit(job)))
            while len(pending) > 2 * workers:
                t, f = pending.popleft()
                yield t, f.result()
        while pending:
            t, f = pending.popleft()
            yield t, f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: running slabs finish (< 1 s), queued ones drop
        torch.set_num_threads(before)


def _write_header(tmp: Path, ckpt: Checkpoint, s: Scheme, plans: list[TensorPlan], imatrix_meta: dict | None) -> dict:
    """Write the header (keys, tensor infos, padding) as the start of `tmp`; returns the keys."""
    w = build_header(ckpt, s, plans, imatrix_meta)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    _pad(fout, fout.tell())
    w.close()
    return dict(w.kv_data[0])


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
                sha256: dict[str, str]) -> int:
    """Re-read `path` and check it holds exactly the intended keys (order, types, values) and
    tensors (order, type, shape, bytes). Returns the number of keys checked.

    Reads with our validating `GGUFFile` (tests check it against `gguf.GGUFReader` on the files we
    write): GGUFReader makes numpy objects for each of the 262k vocabulary strings, ~10 s for the
    demo model on an idle machine, half of llama.cpp's whole convert + quantize; this takes ~0.5 s."""
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
            if _file_sha256(path, t.offset, t.nbytes) != sha256[p.name]:
                raise GemmaQuantError(f"{path}: tensor '{p.name}' bytes read back differently (internal error)")
    finally:
        r.close()
    return len(kv)


def _file_sha256(path: Path, offset: int, n: int, chunk: int = 1 << 26) -> str:
    """sha256 of bytes [offset, offset+n) read with read() calls: pages read through the reader's
    memmap would count in RSS, up to the whole output (5 GB for a 9B Q4_K_M)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while n > 0:
            b = f.read(min(n, chunk))
            if not b:
                break
            h.update(b)
            n -= len(b)
    return h.hexdigest()


class _Writer(gguf.GGUFWriter):
    """GGUFWriter with array values packed by numpy / one join instead of one `_pack_val` call per
    element: the 262k-entry tokens, scores and types arrays took ~2 s. Same bytes (the tests
    compare whole files with convert_hf_to_gguf.py's); anything unusual goes to the original."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        t = gguf.GGUFValueType
        if (vtype != t.ARRAY or sub_type is not None or self.endianess != gguf.GGUFEndian.LITTLE
                or not isinstance(val, (list, tuple)) or len(val) < 256 or len(set(map(type, val))) != 1):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = t.get_type(val[0])
        if ltype == t.STRING:
            u64 = struct.Struct("<Q").pack
            enc = (v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val)
            body = b"".join(u64(len(e)) + e for e in enc)
        elif ltype in (t.INT32, t.FLOAT32, t.BOOL):
            body = np.array(val, dtype={t.INT32: "<i4", t.FLOAT32: "<f4", t.BOOL: "?"}[ltype]).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = (struct.pack("<I", int(vtype)) if add_vtype else b"") + struct.pack("<IQ", int(ltype), len(val))
        return head + body


def build_header(ckpt: Checkpoint, scheme: Scheme, plans: list[TensorPlan],
                 imatrix_meta: dict | None) -> gguf.GGUFWriter:
    """A GGUFWriter (no file yet) holding every key and tensor info of the output."""
    c = ckpt.config
    w = _Writer(None, ARCH[c.generation])
    total = sum(p.numel for p in plans)
    add_model_kvs(w, ckpt.path, c, file_type=CONVERT_FTYPE_BF16, total_params=total)
    arrays = add_vocab(w, ckpt.path, c.generation, c.vocab_size)
    if len(arrays.tokens) != c.vocab_size:  # the Gemma 3 converter cuts token_embd to the token list
        raise GemmaQuantError(f"{ckpt.path}: {len(arrays.tokens)} tokens for vocab_size {c.vocab_size}")
    finish_like_llama_quantize(w, scheme.ftype, imatrix_meta)
    for p in plans:
        rows = p.numel // p.n_per_row
        nbytes = rows * row_bytes(p.type, p.n_per_row)
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.type)
    return w


def _pad(fout, n: int) -> None:
    fout.write(b"\0" * (-n % ALIGNMENT))


def _finish_tensor(fout, p: TensorPlan, n: int, h, sha: dict[str, str]) -> None:
    want = p.numel // p.n_per_row * row_bytes(p.type, p.n_per_row)
    if n != want:
        raise GemmaQuantError(f"tensor '{p.name}': wrote {n} bytes, expected {want} (internal error)")
    sha[p.name] = h.hexdigest()
    _pad(fout, n)


def write_gguf(ckpt: Checkpoint, scheme: str | Scheme, out_path: str | Path, *,
               imatrix: dict[str, torch.Tensor] | None = None, imatrix_meta: dict | None = None,
               force: bool = False, workers: int | None = None,
               progress: Callable[[int, int, TensorPlan], None] | None = None) -> Report:
    """Write `ckpt` as a GGUF `scheme` file at `out_path` (see the module doc).

    `imatrix`: GGUF tensor name -> per-column importance (`imatrix_io.read_imatrix`);
    `imatrix_meta`: {file, dataset, entries_count, chunks_count} for the `quantize.imatrix.*` keys.
    `progress(done, total, plan)` is called after each slab is written (source bytes). `workers`: quantizing threads
    (default: torch's thread count); the bytes do not depend on it."""
    t0 = time.perf_counter()
    s = preset(scheme)
    out_path = Path(out_path)
    check_output(out_path, force=force)
    plans = plan_types(ckpt.config, s, imatrix is not None, has_lm_head="lm_head.weight" in ckpt.names())
    if imatrix is not None and imatrix_meta is None:
        imatrix_meta = {"entries_count": len(imatrix)}
    qws = {p.name: _imatrix_vector(p, imatrix) for p in plans}
    n_workers = workers or torch.get_num_threads()
    sha: dict[str, str] = {}
    with atomic_output(out_path, force=force, kind="file") as tmp:
        kv = _write_header(tmp, ckpt, s, plans, imatrix_meta)
        jobs = (((i, view), job) for i, p in enumerate(plans) for job, view in _tensor_slabs(ckpt, p, qws[p.name]))
        total = sum(p.numel * ckpt.dtype(p.hf_name).itemsize for p in plans)
        current, h, n, done = -1, None, 0, 0
        with open(tmp, "r+b") as fout:
            fout.seek(0, os.SEEK_END)
            for (i, view), chunk in _run_ordered(jobs, n_workers):
                if i != current:
                    if current >= 0:
                        _finish_tensor(fout, plans[current], n, h, sha)
                    current, h, n = i, hashlib.sha256(), 0
                buf = memoryview(np.ascontiguousarray(chunk)).cast("B")
                fout.write(buf)
                h.update(buf)
                n += len(buf)
                del buf, chunk
                release_pages(view)  # once written, the slab's source pages leave RSS (a BF16 slab IS the view)
                done += view.numel() * view.element_size()
                if progress:
                    progress(done, total, plans[i])
            if current >= 0:
                _finish_tensor(fout, plans[current], n, h, sha)
        n_keys = verify_file(tmp, kv, plans, sha)
        size = tmp.stat().st_size
    return Report(out_path, s.name, plans, fallback_count(plans), size, n_keys,
                  time.perf_counter() - t0, sha,
                  [p.name for p in plans if qws[p.name] is not None and p.type not in _NO_IMATRIX])
