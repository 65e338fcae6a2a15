"""A header-only, bounded GGUF reader for `gemmaquant inspect`: any GGUF (every GGML type the `gguf`
package knows, IQ and ternary types included), without touching or allocating the tensor data.

Layout (little-endian, GGUF v2/v3; llama.cpp `ggml/src/gguf.cpp`):
    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv ×      string key | u32 value type | value     string = u64 length + UTF-8 bytes
                                                        array  = u32 element type + u64 count + elements
    n_tensors × string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset
    padding to `general.alignment` (u32, default 32) | tensor data (offsets relative to its start)

Every count, length and offset is checked against the bytes left before it is used, so a header that
claims 10^12 tensors or a 2^60-byte string fails at once instead of allocating; arrays longer than
`preview` elements are summarized (type, count, first values) and skipped without being built.
Errors name the key or tensor and the byte offset. gemmaquant/gguf_file.py is the reader that maps
tensor data for the forward pass (only the types gemmaquant computes with).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import GemmaQuantError
from .inputs import open_input

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


@dataclass(frozen=True)
class ArrayValue:
    """A metadata array: element type name, length, and the first `len(head)` values."""

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
    type_id: int
    type_name: str
    offset: int  # absolute byte offset of the data
    nbytes: int
    n_elements: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    file_size: int
    alignment: int
    data_start: int
    metadata: dict[str, object] = field(default_factory=dict)  # scalars, str, ArrayValue
    value_types: dict[str, str] = field(default_factory=dict)  # key -> GGUF type name
    tensors: list[TensorInfo] = field(default_factory=list)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str, problem: str, at: int | None = None):
        raise GemmaQuantError(f"{self.path}: {what} at byte offset {self.pos if at is None else at}: {problem}")

    def need(self, n: int, what: str):
        if self.pos + n > self.size:
            self.fail(what, f"needs {n} bytes but only {self.size - self.pos} are left (truncated or corrupt)")

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

    def value(self, vtype: int, what: str, preview: int, depth: int = 0):
        if vtype in SCALARS:
            v = self.scalar(SCALARS[vtype][1], what)
            return v
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


def _ggml_type(t: int) -> tuple[str, int, int] | None:
    try:
        qt = GGMLQuantizationType(t)
    except ValueError:
        return None
    if qt not in GGML_QUANT_SIZES:
        return None
    block, nbytes = GGML_QUANT_SIZES[qt]
    return qt.name, block, nbytes


def read_gguf_header(path: str | Path, preview: int = 16) -> GGUFHeader:
    """Parse and validate the header of the GGUF file at `path` (see the module doc)."""
    path = Path(path)
    try:
        with open_input(path, "a GGUF file") as fh:
            size = fh.seek(0, 2)
            if size < 24:
                raise GemmaQuantError(f"{path}: {size} bytes is too short for a GGUF file (header is 24 bytes)")
            # The mmap itself is the buffer: slices are bytes copies and struct reads hold no export,
            # so closing it never fails, whatever an exception's traceback still references.
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, path, size, preview)
    except OSError as e:
        raise GemmaQuantError(f"{path}: cannot read ({e.strerror or e})") from None


def _parse(buf, path: Path, size: int, preview: int) -> GGUFHeader:
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
        h.metadata[key] = cur.value(vtype, f"metadata '{key}'", preview)
        h.value_types[key] = TYPE_NAMES[vtype]
    if "general.alignment" in h.metadata:
        align = h.metadata["general.alignment"]
        if h.value_types["general.alignment"] != "uint32" or align == 0 or align & (align - 1):
            raise GemmaQuantError(f"{path}: metadata 'general.alignment' must be a uint32 power of two, got "
                                  f"{h.value_types['general.alignment']} {align!r}")
        h.alignment = align
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
    for name, ne, t, rel, start in raw_infos:
        h.tensors.append(_tensor(path, h, name, ne, t, rel, start))
    check_no_overlap(path, [(x.offset, x.nbytes, x.name) for x in h.tensors])
    return h


def check_no_overlap(path: Path, tensors: list[tuple[int, int, str]]) -> None:
    """(absolute offset, nbytes, name) per tensor: no two may share a byte. The one verdict of both
    GGUF readers (inspect here, eval/compare in gguf_file.py), so a file one accepts the other does too."""
    spans = sorted((off, off + n, name) for off, n, name in tensors if n)
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise GemmaQuantError(f"{path}: tensors '{an}' and '{bn}' overlap in the data section "
                                  f"(byte offsets {a0} and {b0})")


def _tensor(path: Path, h: GGUFHeader, name: str, ne: list[int], t: int, rel: int, start: int) -> TensorInfo:
    where = f"{path}: tensor '{name}' (info at byte offset {start})"
    kind = _ggml_type(t)
    if kind is None:
        raise GemmaQuantError(f"{where}: unknown GGML type {t}")
    tname, block, bsize = kind
    n = 1
    for d in ne:
        n *= d
    if n > INT64_MAX:
        raise GemmaQuantError(f"{where}: shape {list(reversed(ne))} has more than 2^63 elements (corrupt)")
    if ne[0] % block:
        raise GemmaQuantError(f"{where}: row length {ne[0]} is not a multiple of the {tname} block of {block}")
    nbytes = n // block * bsize
    if rel % h.alignment:
        raise GemmaQuantError(f"{where}: data offset {rel} is not a multiple of the alignment {h.alignment}")
    offset = h.data_start + rel
    if offset + nbytes > h.file_size:
        raise GemmaQuantError(f"{where}: {tname} data at byte offset {offset} needs {nbytes} bytes, but the file "
                              f"ends at byte {h.file_size} (truncated)")
    return TensorInfo(name, tuple(reversed(ne)), t, tname, offset, nbytes, n)
