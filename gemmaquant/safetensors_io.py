"""A validating, memory-mapped safetensors reader: one tensor at a time, never the whole file.

Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data. Every claim of the header is checked against the file before any tensor is touched
(offsets inside the file, no overlaps, size = prod(shape) * itemsize), so a truncated or corrupt
file gives an error naming the file and tensor instead of a crash or a huge allocation.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch

from .errors import GemmaQuantError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class SafetensorsFile:
    """Header parsed and validated at open; tensors are views of a private (copy-on-write) mmap."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise GemmaQuantError(f"{self.path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise GemmaQuantError(f"{self.path}: {size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise GemmaQuantError(
                f"{self.path}: header length {n} is larger than the file ({size} bytes): truncated or not safetensors"
            )
        try:
            header = json.loads(self._fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GemmaQuantError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise GemmaQuantError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for name, info in header.items():
            where = f"{self.path}: tensor '{name}'"
            if not isinstance(info, dict):
                raise GemmaQuantError(f"{where}: header entry is not an object")
            dt = info.get("dtype")
            if dt not in DTYPES:
                raise GemmaQuantError(f"{where}: unsupported dtype {dt!r} (allowed: {', '.join(DTYPES)})")
            shape, offs = info.get("shape"), info.get("data_offsets")
            if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)):
                raise GemmaQuantError(f"{where}: bad shape {shape!r}")
            if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                    or not 0 <= offs[0] <= offs[1]):
                raise GemmaQuantError(f"{where}: bad data_offsets {offs!r}")
            if offs[1] > data_len:
                raise GemmaQuantError(
                    f"{where}: data ends at byte {self._data_start + offs[1]} but the file has {size} bytes (truncated?)"
                )
            nbytes = math.prod(shape) * DTYPES[dt].itemsize
            if nbytes != offs[1] - offs[0]:
                raise GemmaQuantError(
                    f"{where}: shape {shape} of {dt} needs {nbytes} bytes but data_offsets span {offs[1] - offs[0]}"
                )
            self.entries[name] = (DTYPES[dt], tuple(shape), offs[0], offs[1])
            if nbytes:
                spans.append((offs[0], offs[1], name))
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise GemmaQuantError(f"{self.path}: tensors '{an}' and '{bn}' overlap in the data section")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, a, b = self.entries[name]
        return b - a

    def raw_bytes(self, name: str) -> memoryview:
        _, _, a, b = self.entries[name]
        return memoryview(self._mm)[self._data_start + a:self._data_start + b]

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a zero-copy view of the mapping (read it, don't keep it past close())."""
        if name not in self.entries:
            raise GemmaQuantError(f"{self.path}: no tensor named '{name}'")
        dt, shape, a, b = self.entries[name]
        if b == a:
            return torch.empty(shape, dtype=dt)
        t = torch.frombuffer(self._mm, dtype=dt, count=math.prod(shape), offset=self._data_start + a)
        return t.view(shape)

    def close(self):
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
