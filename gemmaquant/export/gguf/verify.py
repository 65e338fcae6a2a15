"""The read-back check of a written GGUF: keys (order, types, values) and tensors (order, type, shape,
CRC-32 of the bytes) against what the writer meant to write."""

from __future__ import annotations

import zlib
from pathlib import Path

import gguf
import numpy as np

from ...errors import GemmaQuantError
from ...formats.gguf.reader import GGUFFile
from .plan import TensorPlan


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
