"""A validating GGUF reader: every length, count, type and offset is checked against the file before
use, so a truncated or corrupt file gives an error naming the key or tensor and the byte offset.

Layout (little-endian, GGUF v2/v3; `gguf-py/gguf/gguf_reader.py`, `ggml/src/gguf.cpp`):
    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv ×      string key | u32 value type | value        (string = u64 length + UTF-8 bytes;
                                                            array = u32 elem type + u64 count + elems)
    n_tensors × string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset
    padding to `general.alignment` (default 32) | tensor data (offsets relative to this point)
ne[0] is the fastest-varying (row) dimension: a torch weight [out, in] is stored with ne = (in, out).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import GemmaQuantError
from .inputs import open_input
from .ggml.types import BLOCK, GGMLType
from .gguf_header import check_no_overlap

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value type -> struct code of the scalar (strings, arrays handled apart).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
MAX_DIMS = 4


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): ne reversed
    qtype: GGMLType
    offset: int  # absolute byte offset in the file
    nbytes: int
    info_offset: int  # where its tensor-info record starts (for error messages)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise GemmaQuantError(f"{self.path}: {what} at byte offset {self.pos} needs {n} bytes but the "
                                  f"file has {self.size} bytes (truncated or corrupt)")

    def scalar(self, code: str, what: str):
        n = struct.calcsize("<" + code)
        self.need(n, what)
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        start, self.pos = self.pos, self.pos + n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GemmaQuantError(f"{self.path}: {what} at byte offset {start} is not valid UTF-8 (corrupt)") from None

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
                out.append(bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8"))
                pos += 8 + n
        except (struct.error, ValueError):  # UnicodeDecodeError is a ValueError
            return [self.string(what) for _ in range(count)]
        self.pos = pos
        return out

    def value(self, vtype: int, what: str):
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            etype = self.scalar("I", what)
            count = self.scalar("Q", what)
            if etype in _NUMPY:  # numeric arrays in one slice (scores: 262k floats)
                itemsize = np.dtype(_NUMPY[etype]).itemsize
                self.need(count * itemsize, what)
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
                self.pos += count * itemsize
                return arr
            if etype == STRING:
                self.need(count * 8, what)  # each string takes at least its length field
                return self.strings(count, what)
            if etype == ARRAY:  # llama.cpp itself rejects nested arrays; so do we (no unbounded recursion)
                raise GemmaQuantError(f"{self.path}: {what}: nested arrays are not valid GGUF metadata (corrupt)")
            raise GemmaQuantError(f"{self.path}: {what}: unknown array element type {etype} (corrupt)")
        raise GemmaQuantError(f"{self.path}: {what}: unknown value type {vtype} at byte offset {self.pos - 4} (corrupt)")


class GGUFFile:
    """Metadata as Python values (numeric arrays as numpy), tensors as zero-copy uint8 views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open_input(self.path, "a GGUF file")
        self.file_size = os.fstat(self._fh.fileno()).st_size
        if self.file_size < 24:
            raise GemmaQuantError(f"{self.path}: {self.file_size} bytes is too short for a GGUF file")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writable views
        cur = _Cursor(memoryview(self._mm), self.path)
        if bytes(self._mm[:4]) != MAGIC:
            raise GemmaQuantError(f"{self.path}: not a GGUF file (magic {bytes(self._mm[:4])!r}, expected b'GGUF')")
        cur.pos = 4
        self.version = cur.scalar("I", "version")
        if self.version not in (2, 3):
            raise GemmaQuantError(f"{self.path}: GGUF version {self.version} is not supported (allowed: 2, 3; "
                                  "big-endian files are not supported)")
        n_tensors, n_kv = cur.scalar("Q", "tensor count"), cur.scalar("Q", "metadata count")
        if n_tensors > self.file_size // 24 or n_kv > self.file_size // 12:
            raise GemmaQuantError(f"{self.path}: header claims {n_tensors} tensors and {n_kv} keys, "
                                  f"impossible in {self.file_size} bytes (corrupt)")
        self.metadata: dict[str, object] = {}
        # key -> (GGUF value type, array element type or None), in file order
        self.types: dict[str, tuple[int, int | None]] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise GemmaQuantError(f"{self.path}: metadata key '{key}' appears twice (corrupt)")
            vtype = cur.scalar("I", f"metadata '{key}' type")
            etype = None
            if vtype == ARRAY:  # peek: value() reads the element type again
                cur.need(4, f"metadata '{key}'")
                (etype,) = struct.unpack_from("<I", cur.buf, cur.pos)
            self.metadata[key] = cur.value(vtype, f"metadata '{key}'")
            self.types[key] = (vtype, etype)
        infos = []
        for i in range(n_tensors):
            start = cur.pos
            name = cur.string(f"tensor info #{i}")
            what = f"tensor '{name}'"
            n_dims = cur.scalar("I", what)
            if not 1 <= n_dims <= MAX_DIMS:
                raise GemmaQuantError(f"{self.path}: {what} (info at byte offset {start}) has {n_dims} "
                                      f"dimensions (allowed 1-{MAX_DIMS}; corrupt)")
            ne = [cur.scalar("Q", what) for _ in range(n_dims)]
            t = cur.scalar("I", what)
            rel = cur.scalar("Q", what)
            infos.append((name, ne, t, rel, start))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(align, (bool, str, list, float, np.ndarray)) or not isinstance(align, (int, np.integer)):
            raise GemmaQuantError(f"{self.path}: general.alignment must be an unsigned integer, got {align!r}")
        align = int(align)
        if align <= 0 or align & (align - 1):
            raise GemmaQuantError(f"{self.path}: general.alignment {align} is not a power of two")
        self.data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, t, rel, start in infos:
            self.tensors[name] = self._check_tensor(name, ne, t, rel, start, align)
        check_no_overlap(self.path, [(t.offset, t.nbytes, t.name) for t in self.tensors.values()])

    def _check_tensor(self, name, ne, t, rel, start, align) -> TensorInfo:
        where = f"{self.path}: tensor '{name}' (info at byte offset {start})"
        try:
            qtype = GGMLType(t)
        except ValueError:
            allowed = ", ".join(x.name for x in GGMLType)
            raise GemmaQuantError(f"{where}: GGML type {t} is not supported (supported: {allowed})") from None
        if name in self.tensors:
            raise GemmaQuantError(f"{where}: duplicate tensor name")
        block, bsize = BLOCK[qtype]
        if any(d <= 0 for d in ne) or ne[0] % block:
            raise GemmaQuantError(f"{where}: shape {list(reversed(ne))} is invalid for {qtype.name} "
                                  f"(rows must be a positive multiple of {block})")
        n = 1
        for d in ne:
            n *= d
        nbytes = n // block * bsize
        if rel % align:
            raise GemmaQuantError(f"{where}: data offset {rel} is not aligned to {align} (corrupt)")
        offset = self.data_start + rel
        if offset + nbytes > self.file_size:
            raise GemmaQuantError(f"{where}: {qtype.name} data at byte offset {offset} needs {nbytes} bytes, "
                                  f"but the file ends at byte {self.file_size} (truncated)")
        return TensorInfo(name, tuple(reversed(ne)), qtype, offset, nbytes, start)

    def raw(self, name: str) -> torch.Tensor:
        """uint8 [rows, row_bytes] view (zero-copy, backed by a private mmap) of a tensor's blocks."""
        info = self.tensors[name]
        rows = info.nbytes // self.row_bytes(name)
        arr = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return torch.from_numpy(arr).view(rows, -1)

    def row_bytes(self, name: str) -> int:
        info = self.tensors[name]
        block, bsize = BLOCK[info.qtype]
        return info.shape[-1] // block * bsize

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def close(self):
        try:
            self._mm.close()
        except BufferError:  # tensors still view it; the mapping goes when they do
            pass
        self._fh.close()
