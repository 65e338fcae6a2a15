"""A GGUF file with some tensors' bytes replaced in place: same names, types, shapes, offsets and size.

Error-feedback rounding (calib/ggml_gptq.py) changes only the codes inside llama.cpp's blocks, so an
optimized file is its template (our writer's or llama-quantize's file with the same type mix) with the
data of the optimized tensors overwritten. Everything else, header and metadata included, is the
template's, byte for byte.

    with GGUFPatcher(template, out, inputs=[...]) as p:   # copies the template to a temporary
        p.write("blk.0.ffn_down.weight", data)           # uint8, exactly the tensor's byte count
    # on success: every written tensor is read back (CRC-32) and the file renamed into place

`consume=True` is for a template that is our own scratch file: it is moved (renamed) to the temporary
instead of copied, so a run holds one file's size on disk, not two (a copy only where the rename
crosses filesystems).
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from ...errors import GemmaQuantError
from ..atomic import atomic_output
from ...formats.gguf.reader import GGUFFile


class GGUFPatcher:
    def __init__(self, template: str | Path, out: str | Path, *, force: bool = False, inputs=(),
                 consume: bool = False):
        self.template, self.out, self.force, self.consume = Path(template), Path(out), force, consume
        self.inputs = [self.template, *inputs]
        src = GGUFFile(self.template)
        try:
            self.tensors = dict(src.tensors)
        finally:
            src.close()
        self.crcs: dict[str, int] = {}

    def __enter__(self) -> GGUFPatcher:
        self._ctx = atomic_output(self.out, force=self.force, kind="file", inputs=self.inputs)
        self.tmp = self._ctx.__enter__()
        try:
            moved = False
            if self.consume:
                try:
                    os.replace(self.template, self.tmp)
                    moved = True
                except OSError:  # another filesystem: copy
                    pass
            if not moved:
                shutil.copyfile(self.template, self.tmp)
            self._fh = open(self.tmp, "r+b")
        except BaseException as e:
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def write(self, name: str, data: np.ndarray) -> None:
        """Overwrite tensor `name`'s bytes with `data` (uint8, the tensor's exact byte count)."""
        info = self.tensors.get(name)
        if info is None:
            raise GemmaQuantError(f"{self.template}: no tensor '{name}' to replace")
        buf = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        if buf.nbytes != info.nbytes:
            raise GemmaQuantError(f"tensor '{name}': {buf.nbytes} bytes given, the {info.qtype.name} tensor of "
                                  f"{self.template} has {info.nbytes}")
        self._fh.seek(info.offset)
        self._fh.write(memoryview(buf))
        self.crcs[name] = zlib.crc32(memoryview(buf))

    def __exit__(self, et, ev, tb):
        try:
            self._fh.close()
            if et is None:
                self._verify()
        except BaseException as e:
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        return self._ctx.__exit__(et, ev, tb)

    def _verify(self) -> None:
        r = GGUFFile(self.tmp)
        try:
            if {n: (t.qtype, t.shape, t.offset) for n, t in r.tensors.items()} != \
                    {n: (t.qtype, t.shape, t.offset) for n, t in self.tensors.items()}:
                raise GemmaQuantError(f"{self.out}: tensor layout changed while patching (internal error)")
            for name, crc in self.crcs.items():
                if zlib.crc32(r.raw(name).numpy().reshape(-1)) != crc:
                    raise GemmaQuantError(f"{self.out}: tensor '{name}' reads back differently (internal error)")
        finally:
            r.close()
