"""The one GGUF reader: every length, count, type and offset is checked against the file before it is
used, so a truncated or corrupt file gives one error naming the key or tensor and the byte offset, and
a header that claims 10^12 tensors or a 2^60-byte string fails at once instead of allocating.

    GGUFFile(path)            metadata as Python values (numeric arrays as numpy), tensors as zero-copy
                              uint8 views of a private mapping: what eval, compare, the demo build and
                              the writer's read-back use
    read_gguf_header(path)    header only (`inspect`): arrays longer than `preview` elements are
                              summarized (ArrayValue) and skipped without being built, the file is
                              unmapped before it returns, tensor data is never touched

Both run the same parser, so a file one accepts the other accepts too. Tensor types are checked against
the `gguf` package's table (any type it knows, IQ and ternary ones included); which types gemmaquant
can compute with is the evaluator's question, not the reader's.

Layout (little-endian, GGUF v2/v3; llama.cpp `ggml/src/gguf.cpp`):
    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv ×      string key | u32 value type | value     string = u64 length + UTF-8 bytes
                                                        array  = u32 element type + u64 count + elements
    n_tensors × string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset
    padding to `general.alignment` (u32, default 32) | tensor data (offsets relative to its start)
ne[0] is the fastest-varying (row) dimension: a torch weight [out, in] is stored with ne = (in, out).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ...errors import GemmaQuantError
from ..inputs import open_input

if TYPE_CHECKING:
    import torch

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays; llama.cpp itself reads none (gguf.cpp: "nested arrays are not supported")
INT64_MAX = (1 << 63) - 1
STRING, ARRAY = 8, 9
# GGUF value type -> (name, struct code); strings and arrays are handled apart.
SCALARS = {0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"), 4: ("uint32", "I"),
           5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"), 10: ("uint64", "Q"), 11: ("int64", "q"),
           12: ("float64", "d")}
TYPE_NAMES = {**{k: v[0] for k, v in SCALARS.items()}, STRING: "string", ARRAY: "array"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass(frozen=True)
class ArrayValue:
    """A metadata array read header-only: element type name, length, and the first `len(head)` values."""

    elem_type: str
    count: int
    head: list

    @property
    def complete(self) -> bool:
        return len(self.head) == self.count


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): GGUF's ne reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset of the data
    nbytes: int
    n_elements: int

    @property
    def type_name(self) -> str:
        return self.qtype.name


@dataclass
class GGUFHeader:
    path: Path
    version: int
    file_size: int
    alignment: int
    data_start: int
    metadata: dict[str, object] = field(default_factory=dict)  # scalars, str, arrays (ArrayValue header-only)
    types: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> (value type, element type)
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def value_types(self) -> dict[str, str]:
        """key -> GGUF type name ('uint32', 'array', ...)."""
        return {k: TYPE_NAMES[t] for k, (t, _) in self.types.items()}


class _Cursor:
    """Reads `buf` (the mapping itself: its slices are bytes copies and struct reads hold no export,
    so closing it never fails, whatever an exception's traceback still references)."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str, problem: str, at: int | None = None):
        raise GemmaQuantError(f"{self.path}: {what} at byte offset {self.pos if at is None else at}: {problem}")

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            self.fail(what, f"needs {n} bytes, but the file ends at byte offset {self.size} (truncated or corrupt)")

    def scalar(self, code: str, what: str):
        n = struct.calcsize("<" + code)
        self.need(n, what)
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, keep: bool = True) -> str | None:
        start = self.pos
        n = self.scalar("Q", what)
        self.need(n, what)
        self.pos += n
        if not keep:
            return None
        try:
            return self.buf[self.pos - n:self.pos].decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(what, f"string is not valid UTF-8 (byte {e.start} of {n})", at=start)

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row (the 262k-token vocabulary): one tight loop; on any problem the
        checked per-string path re-reads them and raises naming the offset."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        try:
            out = []
            for _ in range(count):
                (n,) = unpack(buf, pos)
                if pos + 8 + n > size:
                    raise ValueError
                out.append(buf[pos + 8:pos + 8 + n].decode("utf-8"))
                pos += 8 + n
        except (struct.error, ValueError):  # UnicodeDecodeError is a ValueError
            return [self.string(what) for _ in range(count)]
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, preview: int | None, depth: int = 0):
        """One value. Arrays: whole (numpy for numbers, a list otherwise) when `preview` is None, else
        an ArrayValue holding the first `preview` elements."""
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype][1], what)
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY:
            self.fail(what, f"unknown value type {vtype} (allowed 0-12)", at=self.pos - 4)
        if depth >= MAX_NESTING:
            self.fail(what, f"arrays nested more than {MAX_NESTING} deep")
        etype = self.scalar("I", what)
        count = self.scalar("Q", what)
        if etype not in TYPE_NAMES:
            self.fail(what, f"unknown array element type {etype} (allowed 0-12)", at=self.pos - 12)
        # Each element takes at least its fixed size (8 for a string's length, 12 for an array's header).
        least = struct.calcsize("<" + SCALARS[etype][1]) if etype in SCALARS else (8 if etype == STRING else 12)
        self.need(count * least, f"{what} ({count} × {TYPE_NAMES[etype]})")
        if preview is None:
            if etype in SCALARS:  # numeric arrays in one slice (scores: 262k floats)
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
                self.pos += count * least
                return arr
            if etype == STRING:
                return self.strings(count, what)
            return [self.value(ARRAY, what, None, depth + 1) for _ in range(count)]
        head = [self.value(etype, what, preview, depth + 1) for _ in range(min(count, preview))]
        rest = count - len(head)
        if etype in SCALARS:
            self.pos += rest * least
        else:
            for _ in range(rest):
                if etype == STRING:
                    self.string(what, keep=False)
                else:
                    self.value(ARRAY, what, 0, depth + 1)
        return ArrayValue(TYPE_NAMES[etype], count, head)


def _parse(buf, path: Path, size: int, preview: int | None) -> GGUFHeader:
    if size < 24:
        raise GemmaQuantError(f"{path}: {size} bytes is too short for a GGUF file (header is 24 bytes)")
    if buf[:4] != MAGIC:
        raise GemmaQuantError(f"{path}: not a GGUF file (magic {buf[:4]!r} at byte offset 0, expected b'GGUF')")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.scalar("I", "version")
    if version not in (2, 3):
        cur.fail("version", f"GGUF version {version} is not supported (allowed: 2, 3; big-endian files "
                 "read as a huge version)", at=4)
    n_tensors, n_kv = cur.scalar("Q", "tensor count"), cur.scalar("Q", "metadata count")
    # A key takes >= 12 bytes (length + type), a tensor info >= 24 (length, n_dims, ne[0], type, offset).
    if n_kv * 12 + n_tensors * 24 > size - 24:
        cur.fail("header", f"claims {n_kv} keys and {n_tensors} tensors, impossible in {size} bytes (corrupt)", at=8)
    h = GGUFHeader(path, version, size, DEFAULT_ALIGNMENT, 0)
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in h.metadata:
            cur.fail(f"metadata key '{key}'", "duplicate key")
        vtype = cur.scalar("I", f"metadata '{key}' type")
        etype = None
        if vtype == ARRAY:  # peek: value() reads the element type again
            cur.need(4, f"metadata '{key}'")
            (etype,) = struct.unpack_from("<I", buf, cur.pos)
        h.metadata[key] = cur.value(vtype, f"metadata '{key}'", preview)
        h.types[key] = (vtype, etype)
    if "general.alignment" in h.metadata:
        align = h.metadata["general.alignment"]
        kind = TYPE_NAMES[h.types["general.alignment"][0]]
        if kind != "uint32" or align == 0 or align & (align - 1):
            raise GemmaQuantError(f"{path}: metadata 'general.alignment' must be a uint32 power of two, got "
                                  f"{kind} {align!r}")
        h.alignment = int(align)
    seen: set[str] = set()
    raw_infos = []
    for i in range(n_tensors):
        start = cur.pos
        name = cur.string(f"tensor info #{i}")
        what = f"tensor '{name}'"
        if name in seen:
            cur.fail(what, "duplicate tensor name", at=start)
        seen.add(name)
        n_dims = cur.scalar("I", what)
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(what, f"{n_dims} dimensions (allowed 1-{MAX_DIMS})", at=start)
        ne = [cur.scalar("Q", what) for _ in range(n_dims)]
        t = cur.scalar("I", what)
        rel = cur.scalar("Q", what)
        raw_infos.append((name, ne, t, rel, start))
    h.data_start = -(-cur.pos // h.alignment) * h.alignment
    h.tensors = [_tensor(path, h, *info) for info in raw_infos]
    _check_no_overlap(path, h.tensors)
    return h


def _tensor(path: Path, h: GGUFHeader, name: str, ne: list[int], t: int, rel: int, start: int) -> TensorInfo:
    where = f"{path}: tensor '{name}' (info at byte offset {start})"
    try:
        qtype = GGMLQuantizationType(t)
        block, bsize = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GemmaQuantError(f"{where}: unknown GGML type {t}") from None
    n = math.prod(ne)
    if n > INT64_MAX:
        raise GemmaQuantError(f"{where}: shape {list(reversed(ne))} has more than 2^63 elements (corrupt)")
    if ne[0] % block:
        raise GemmaQuantError(f"{where}: row length {ne[0]} is not a multiple of the {qtype.name} block of {block}")
    nbytes = n // block * bsize
    if rel % h.alignment:
        raise GemmaQuantError(f"{where}: data offset {rel} is not a multiple of the alignment {h.alignment}")
    offset = h.data_start + rel
    if offset + nbytes > h.file_size:
        raise GemmaQuantError(f"{where}: {qtype.name} data at byte offset {offset} needs {nbytes} bytes, but the file "
                              f"ends at byte {h.file_size} (truncated)")
    return TensorInfo(name, tuple(reversed(ne)), qtype, offset, nbytes, n)


def _check_no_overlap(path: Path, tensors: list[TensorInfo]) -> None:
    """No two tensors may share a byte (llama.cpp's loader would read one tensor's data as another's)."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise GemmaQuantError(f"{path}: tensors '{an}' and '{bn}' overlap in the data section "
                                  f"(byte offsets {a0} and {b0})")


def read_gguf_header(path: str | Path, preview: int = 16) -> GGUFHeader:
    """The header of the GGUF file at `path` (see the module doc); the file is closed on return."""
    path = Path(path)
    try:
        with open_input(path, "a GGUF file") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise GemmaQuantError(f"{path}: {size} bytes is too short for a GGUF file (header is 24 bytes)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, path, size, preview)
    except OSError as e:
        raise GemmaQuantError(f"{path}: cannot read ({e.strerror or e})") from None


class GGUFFile:
    """A whole GGUF: metadata as Python values (numeric arrays as numpy), tensors by name as zero-copy
    uint8 views of a private (copy-on-write) mapping that stays open until `close()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open_input(self.path, "a GGUF file")
        self._mm = None
        try:
            self.file_size = os.fstat(self._fh.fileno()).st_size
            if self.file_size < 24:
                raise GemmaQuantError(f"{self.path}: {self.file_size} bytes is too short for a GGUF file "
                                      "(header is 24 bytes)")
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writable views
            h = _parse(self._mm, self.path, self.file_size, None)
        except BaseException:
            self.close()
            raise
        self.version, self.alignment, self.data_start = h.version, h.alignment, h.data_start
        self.metadata, self.types = h.metadata, h.types
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in h.tensors}

    def raw(self, name: str) -> "torch.Tensor":
        """uint8 [rows, row_bytes] view (zero-copy, backed by the private mapping) of a tensor's blocks."""
        import torch

        info = self.tensors[name]
        arr = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return torch.from_numpy(arr).view(math.prod(info.shape[:-1]), -1)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def close(self):
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # tensors still view it; the mapping goes when they do
                self._mm.close()
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
