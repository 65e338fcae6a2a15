"""A validating, memory-mapped safetensors reader: one tensor at a time, never the whole file.

Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data. Every claim of the header is checked against the file before any tensor is touched
(offsets inside the file, no overlaps, size = prod(shape) * itemsize), so a truncated or corrupt
file gives an error naming the file and tensor instead of a crash or a huge allocation.

Memory: pages of a file mapping that were read count in the process's RSS until they are unmapped
or the kernel reclaims them, so streaming an 18 GB checkpoint through one mmap would report an
18 GB peak RSS. Pages are therefore dropped from the mapping once consumed, with
madvise(MADV_DONTNEED) on the page-aligned range (the page cache keeps them, so a re-read is a minor
fault, not a disk read):
* automatically: tensors handed out by `get`/`raw_bytes` are remembered process-wide, oldest first,
  and once they add up to more than RESIDENT_WINDOW bytes the oldest are dropped (a reader that
  walks the model tensor by tensor or layer by layer stays flat without knowing about this);
* explicitly: `release_pages(view)` drops the pages under a view at once, and `stream_bytes(buf)`
  yields a buffer in chunks, dropping each chunk's pages after the consumer is done with it.
Dropping is always correct for these mappings: they are private (copy-on-write) and never written,
so an unmodified page that is touched again is simply faulted back in from the file. A caller that
wrote into a view would lose its change, which is why views are read-only by contract.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from ..errors import GemmaQuantError
from .inputs import open_input

if TYPE_CHECKING:
    import torch

# safetensors dtype -> bytes per element. torch is imported only when a tensor is handed out, so
# reading headers and configs (plans, the GGUF header job) does not pay its import (RESULTS.md §2).
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_DTYPES: dict = {}


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype name (imports torch on first use)."""
    if not _DTYPES:
        import torch
        _DTYPES.update({k: getattr(torch, v) for k, v in _TORCH_NAMES.items()})
    return _DTYPES[name]


def dtype_name(dt: "torch.dtype") -> str:
    """The safetensors name of a torch dtype ('BF16' for torch.bfloat16)."""
    torch_dtype("F32")
    for k, v in _DTYPES.items():
        if v == dt:
            return k
    raise KeyError(dt)
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
PAGE = mmap.PAGESIZE
# Bytes of handed-out tensors allowed to stay mapped-in before the oldest are dropped (env override
# for experiments: GEMMAQUANT_RESIDENT_MB). Larger than one Gemma 2 9B decoder layer in bf16 (396 MB).
RESIDENT_WINDOW = int(os.environ.get("GEMMAQUANT_RESIDENT_MB", "512")) << 20
STREAM_CHUNK = 64 << 20  # stream_bytes' chunk: big enough for full-speed write()/hash calls
_CAN_DROP = hasattr(mmap, "MADV_DONTNEED")
_OPEN: "weakref.WeakSet[SafetensorsFile]" = weakref.WeakSet()  # mappings release_pages may touch


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list) -> dict:
    """json object hook: a key given twice is ambiguous (readers disagree on which one wins)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _Recent:
    """Tensors handed out, oldest first, with their byte ranges in the mapping: (file, start) -> end."""

    def __init__(self):
        self.ranges: OrderedDict[tuple[int, int], tuple[weakref.ref, int, int]] = OrderedDict()
        self.total = 0

    def touch(self, f: "SafetensorsFile", start: int, end: int) -> None:
        key = (id(f), start)
        if key in self.ranges:
            self.ranges.move_to_end(key)
            return
        self.ranges[key] = (weakref.ref(f), start, end)
        self.total += end - start
        while self.total > RESIDENT_WINDOW and len(self.ranges) > 1:  # the newest one always stays
            _, (ref, a, b) = self.ranges.popitem(last=False)
            self.total -= b - a
            old = ref()
            if old is not None:
                old._drop(a, b)


_RECENT = _Recent()


class SafetensorsFile:
    """Header parsed and validated at open; tensors are views of a private (copy-on-write) mmap."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open_input(self.path, "a safetensors file")
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise GemmaQuantError(f"{self.path}: {size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > MAX_HEADER:
            raise GemmaQuantError(f"{self.path}: header length {n} is larger than the {MAX_HEADER} bytes safetensors "
                                  "allows (corrupt or not safetensors)")
        if n > size - 8:
            raise GemmaQuantError(
                f"{self.path}: header length {n} is larger than the file ({size} bytes): truncated or not safetensors"
            )
        try:
            header = json.loads(self._fh.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise GemmaQuantError(f"{self.path}: header has the key '{e.key}' twice (the safetensors library "
                                  "refuses duplicate keys)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GemmaQuantError(f"{self.path}: header is not valid JSON ({e})") from None
        except RecursionError:
            raise GemmaQuantError(f"{self.path}: header is not valid JSON (nested too deeply)") from None
        except ValueError as e:  # an integer longer than Python's 4300-digit limit
            raise GemmaQuantError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise GemmaQuantError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise GemmaQuantError(f"{self.path}: header '__metadata__' is not a JSON object")
        for k, v in self.metadata.items():
            if not isinstance(v, str):
                raise GemmaQuantError(f"{self.path}: header '__metadata__' value of '{k}' is {type(v).__name__}, "
                                      "not a string (the safetensors library refuses it)")
        self._data_start = 8 + n
        data_len = size - self._data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # dtype name, shape, [a, b)
        spans = []
        for name, info in header.items():
            where = f"{self.path}: tensor '{name}'"
            if not isinstance(info, dict):
                raise GemmaQuantError(f"{where}: header entry is not an object")
            dt = info.get("dtype")
            if not isinstance(dt, str) or dt not in ITEMSIZE:
                raise GemmaQuantError(f"{where}: unsupported dtype {dt!r} (allowed: {', '.join(ITEMSIZE)})")
            shape, offs = info.get("shape"), info.get("data_offsets")
            if (not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape)):
                raise GemmaQuantError(f"{where}: bad shape {shape!r}")
            if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                    or not 0 <= offs[0] <= offs[1]):
                raise GemmaQuantError(f"{where}: bad data_offsets {offs!r}")
            if offs[1] > data_len:
                raise GemmaQuantError(
                    f"{where}: data ends at byte {self._data_start + offs[1]} but the file has {size} bytes (truncated?)"
                )
            nbytes = math.prod(shape) * ITEMSIZE[dt]
            if nbytes != offs[1] - offs[0]:
                raise GemmaQuantError(
                    f"{where}: shape {shape} of {dt} needs {nbytes} bytes but data_offsets span {offs[1] - offs[0]}"
                )
            self.entries[name] = (dt, tuple(shape), offs[0], offs[1])
            if nbytes:
                spans.append((offs[0], offs[1], name))
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise GemmaQuantError(f"{self.path}: tensors '{an}' and '{bn}' overlap in the data section")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self._size = size
        self._base = 0
        if self._mm is not None:
            probe = np.frombuffer(self._mm, dtype=np.uint8, count=1)  # the mapping's address
            self._base = probe.ctypes.data
            del probe  # a live export would make close() fail
            _OPEN.add(self)

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> "torch.dtype":
        return torch_dtype(self.entries[name][0])

    def dtype_name(self, name: str) -> str:
        """The stored dtype as safetensors names it ('BF16'), without importing torch."""
        return self.entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, a, b = self.entries[name]
        return b - a

    def data_offset(self, name: str) -> int:
        """Absolute byte offset of a tensor's data in the file (for messages naming corrupt bytes)."""
        return self._data_start + self.entries[name][2]

    def raw_bytes(self, name: str) -> memoryview:
        _, _, a, b = self.entries[name]
        if b > a:
            _RECENT.touch(self, self._data_start + a, self._data_start + b)
        return memoryview(self._mm)[self._data_start + a:self._data_start + b]

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a zero-copy view of the mapping (read it, don't keep it past close())."""
        if name not in self.entries:
            raise GemmaQuantError(f"{self.path}: no tensor named '{name}'")
        import torch

        name_dt, shape, a, b = self.entries[name]
        dt = torch_dtype(name_dt)
        if b == a:
            return torch.empty(shape, dtype=dt)
        _RECENT.touch(self, self._data_start + a, self._data_start + b)
        t = torch.frombuffer(self._mm, dtype=dt, count=math.prod(shape), offset=self._data_start + a)
        return t.view(shape)

    def release(self, name: str | None = None) -> None:
        """Drop the resident pages of tensor `name` (all of the mapping for None); views stay valid."""
        if name is None:
            self._drop(0, self._size)
        else:
            _, _, a, b = self.entries[name]
            self._drop(self._data_start + a, self._data_start + b)

    def _drop(self, start: int, end: int) -> None:
        """madvise(DONTNEED) on [start, end) of the mapping, widened to whole pages. Widening can
        drop a neighbour tensor's edge pages too; harmless, they fault back in unchanged."""
        if not _CAN_DROP or self._mm is None or self._mm.closed or end <= start:
            return
        a = start - start % PAGE
        b = min(self._size, end + (-end % PAGE))
        self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    def close(self):
        _OPEN.discard(self)
        # Views handed out keep the mapping alive through the buffer protocol; closing the file
        # handle is always safe, closing the map is only safe when no view is left.
        try:
            if self._mm is not None:
                self._mm.close()
        except BufferError:
            pass
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _span(buf: torch.Tensor | memoryview | np.ndarray) -> tuple[int, int]:
    """[first, last+1) byte addresses a tensor / buffer covers (strides may be any, not negative)."""
    if not isinstance(buf, (memoryview, np.ndarray)):  # a torch.Tensor
        if buf.numel() == 0:
            return 0, 0
        extent = sum((n - 1) * st for n, st in zip(buf.shape, buf.stride())) + 1
        return buf.data_ptr(), buf.data_ptr() + extent * buf.element_size()
    arr = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, memoryview) else buf
    if arr.nbytes == 0:
        return 0, 0
    lo, hi = np.byte_bounds(arr) if hasattr(np, "byte_bounds") else np.lib.array_utils.byte_bounds(arr)
    return lo, hi


def release_pages(buf: torch.Tensor | memoryview | np.ndarray) -> int:
    """Drop the resident pages under `buf` if it is a view of an open SafetensorsFile mapping (a
    no-op for any other memory, whose contents MADV_DONTNEED would destroy). Returns the bytes
    released. Call it when done with a view: its pages stop counting in RSS."""
    lo, hi = _span(buf)
    if hi <= lo:
        return 0
    for f in list(_OPEN):
        if f._mm is not None and f._base <= lo and hi <= f._base + f._size:
            f._drop(lo - f._base, hi - f._base)
            return hi - lo
    return 0


def stream_bytes(buf: memoryview, chunk: int = STREAM_CHUNK) -> Iterator[memoryview]:
    """`buf` in chunks of `chunk` bytes; each chunk's pages are released once the consumer asks for
    the next one (so copying or hashing a 2 GB mapped tensor keeps ~`chunk` bytes resident)."""
    buf = memoryview(buf).cast("B")
    for i in range(0, len(buf), chunk):
        part = buf[i:i + chunk]
        yield part
        release_pages(part)
