"""llama.cpp importance-matrix files: read both formats, write the GGUF one (docs/gguf-gemma.md §5).

GGUF (llama-imatrix's default since PR #14842; `tools/imatrix/imatrix.cpp` save_imatrix):
    keys     general.type = "imatrix", imatrix.datasets (string[]), imatrix.chunk_count (u32),
             imatrix.chunk_size (u32) -- llama-quantize refuses a file missing any of the three
    tensors  sorted by name, per weight `<w>`: `<w>.in_sum2` F32 ne=(n_per_row, n_mat), the sum over
             all tokens of x_j², and `<w>.counts` F32 ne=(1, n_mat), the token count. With n_mat = 1
             ggml drops the trailing 1, so the shapes are [n] and [1].
Legacy .dat (`common/imatrix-loader.cpp`):
    i32 n_entries; per entry: i32 name_len, name, i32 ncall, i32 nval, f32[nval] values
    where values = (sum / count) * ncall; optional tail: i32 chunk_count, i32 len, dataset bytes.

What llama-quantize feeds `ggml_quantize_chunk` (tools/quantize/quantize.cpp load_imatrix), in f32:
GGUF: in_sum2 / float(lround(count)), or 1.0 for every column when the count is 0;
legacy: values / ncall when ncall > 0, else the values as stored. Non-finite results abort.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import GemmaQuantError
from ..inputs import open_input, read_bytes
from .reader import GGUFFile

if TYPE_CHECKING:
    import torch

_GGUF_MAGIC = b"GGUF"
MAX_LEGACY_BYTES = 1 << 30  # a 27B model's legacy .dat is ~30 MB


@dataclass
class Imatrix:
    """Per-column importance by GGUF weight name, plus what `quantize.imatrix.*` records."""

    path: str
    importance: dict[str, "torch.Tensor"]  # name -> float32 [n_per_row * n_mat]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    # GGUF entries with one count per expert (MoE `*_exps` tensors): the counts as stored
    expert_counts: dict[str, list[int]] = field(default_factory=dict)

    def meta(self) -> dict:
        """The values llama-quantize writes as quantize.imatrix.{file,dataset,entries_count,chunks_count}."""
        return {"file": self.path, "dataset": self.datasets[0] if self.datasets else None,
                "entries_count": len(self.importance), "chunks_count": self.chunk_count}


def _finite(name: str, v: "torch.Tensor", path) -> "torch.Tensor":
    import torch

    if not torch.isfinite(v).all():
        raise GemmaQuantError(f"{path}: imatrix entry '{name}' contains non-finite values")
    return v


def _read_gguf(path: Path) -> Imatrix:
    """Through the one GGUF reader: a truncated or malformed file names the byte offset."""
    import torch

    with GGUFFile(path) as r:
        keys = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
        missing = [k for k in keys if k not in r.metadata]
        if missing:
            raise GemmaQuantError(f"{path}: missing imatrix metadata ({', '.join(missing)}); "
                                  "is this an imatrix written by llama-imatrix?")
        ds = r.metadata["imatrix.datasets"]
        datasets = [ds] if isinstance(ds, str) else [d for d in ds if isinstance(d, str)] if isinstance(ds, list) else []
        chunk_count = _count(r, "imatrix.chunk_count")
        chunk_size = _count(r, "imatrix.chunk_size")
        sums, counts = {}, {}
        for t in r.tensors.values():
            for suffix, d in ((".in_sum2", sums), (".counts", counts)):
                if t.name.endswith(suffix):
                    if t.type_name != "F32":
                        raise GemmaQuantError(f"{path}: '{t.name}' must be F32, got {t.type_name}")
                    d[t.name[: -len(suffix)]] = r.raw(t.name).numpy().view(np.float32).reshape(-1).copy()
    if not sums and not counts:
        raise GemmaQuantError(f"{path}: the imatrix holds no entries")
    importance, per_expert = {}, {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise GemmaQuantError(f"{path}: mismatched sums and counts for '{name}'")
        s, c = torch.from_numpy(sums[name]), torch.from_numpy(counts[name])
        n_mat = c.numel()
        if n_mat > 1:
            per_expert[name] = [int(round(float(x))) for x in c]
        if n_mat == 0 or s.numel() % n_mat:
            raise GemmaQuantError(f"{path}: '{name}' has {s.numel()} sums for {n_mat} counts")
        # lround, then back to float (ties away from zero; counts are whole numbers in practice)
        cnt = (torch.floor(c.double().abs() + 0.5) * torch.sign(c.double())).float().reshape(n_mat, 1)
        s = s.reshape(n_mat, -1)
        v = torch.where(cnt > 0, s / torch.where(cnt > 0, cnt, 1.0), torch.ones_like(s))
        importance[name] = _finite(name, v.reshape(-1).contiguous(), path)
    return Imatrix(str(path), importance, datasets, chunk_count, chunk_size, legacy=False, expert_counts=per_expert)


def expert_report(counts: dict[str, list[int]]) -> str:
    """One line on MoE experts' token counts ({`blk.N.ffn_gate_up_exps.weight`: per expert}), naming
    the experts that saw none; "" when there are no expert entries."""
    counts = {n: c for n, c in counts.items() if "_exps." in n and "ffn_down_exps" not in n} or counts
    if not counts:
        return ""
    every = [c for cs in counts.values() for c in cs]
    idle = [f"{n.split('.')[1]}:{e}" for n, cs in sorted(counts.items(), key=lambda kv: int(kv[0].split(".")[1]))
            for e, c in enumerate(cs) if c == 0]
    line = (f"experts saw {min(every)}-{max(every)} tokens each (median {sorted(every)[len(every) // 2]}) "
            f"over {len(counts)} MoE layers")
    if idle:
        shown = ", ".join(idle[:12]) + (f", … ({len(idle)} in all)" if len(idle) > 12 else "")
        line += (f"; {len(idle)} of {len(every)} experts saw no token (layer:expert {shown}): llama-quantize reads "
                 "a zero count as importance 1.0 in every column, so those experts are quantized as without an "
                 "imatrix (as here); more calibration text reaches more experts")
    return line


def _count(r: GGUFFile, key: str) -> int:
    v = r.metadata[key]
    if isinstance(v, (bool, str, list, np.ndarray)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise GemmaQuantError(f"{r.path}: '{key}' must be a number, got {v!r}")
    return int(v)


def _read_legacy(path: Path, data: bytes) -> Imatrix:
    import torch

    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise GemmaQuantError(f"{path}: truncated legacy imatrix at byte {pos}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise GemmaQuantError(f"{path}: not an imatrix (no entries; expected a GGUF or legacy .dat file)")
    importance = {}
    for i in range(n_entries):
        (name_len,) = take("<i")
        if name_len < 0 or pos + name_len > len(data):
            raise GemmaQuantError(f"{path}: bad name length {name_len} in entry {i + 1}")
        name = data[pos:pos + name_len].split(b"\0")[0].decode("utf-8", errors="replace")
        pos += name_len
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise GemmaQuantError(f"{path}: bad value count {nval} in entry '{name}'")
        vals = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=nval, offset=pos).copy())
        pos += 4 * nval
        importance[name] = _finite(name, vals / float(ncall) if ncall > 0 else vals, path)
    datasets, chunk_count = [], 0
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (ds_len,) = take("<i")
            if 0 < ds_len <= len(data) - pos:
                datasets.append(data[pos:pos + ds_len].split(b"\0")[0].decode("utf-8", errors="replace"))
    return Imatrix(str(path), importance, datasets, chunk_count, 0, legacy=True)


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a llama.cpp imatrix (GGUF or legacy .dat), as llama-quantize interprets it."""
    p = Path(path)
    if not p.exists():
        raise GemmaQuantError(f"{p}: no such imatrix file")
    with open_input(p, "an imatrix file") as f:
        head = f.read(4)
    if head == _GGUF_MAGIC:
        im = _read_gguf(p)
    else:
        im = _read_legacy(p, read_bytes(p, "legacy imatrix file", MAX_LEGACY_BYTES))
    im.path = str(path)  # llama-quantize records the path as the user typed it
    return im


def write_imatrix(path: str | Path, sums: dict[str, "torch.Tensor"], counts: dict[str, "torch.Tensor | int"],
                  *, datasets: list[str], chunk_count: int, chunk_size: int) -> None:
    """Write llama-imatrix's GGUF format. `sums[name]`: Σ x² per input column, [n] or [n_mat, n];
    `counts[name]`: tokens seen, an int or [n_mat]. Entries are stored sorted by name."""
    import gguf
    import torch
    if not datasets:  # gguf.GGUFWriter cannot write an empty array; llama-imatrix always has one
        raise GemmaQuantError(f"{path}: an imatrix needs at least one dataset name")
    w = gguf.GGUFWriter(path, "")
    w.kv_data[0].clear()  # an imatrix has no general.architecture
    w.add_string("general.type", "imatrix")
    w.add_key_value("imatrix.datasets", list(datasets), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name in sorted(sums):
        s = sums[name].detach().to(torch.float32).cpu()
        s = s.reshape(1, -1) if s.dim() == 1 else s
        c = torch.as_tensor(counts[name], dtype=torch.float32).reshape(-1)
        if c.numel() != s.shape[0]:
            raise GemmaQuantError(f"imatrix entry '{name}': {c.numel()} counts for {s.shape[0]} matrices")
        arr, cnt = s.numpy(), c.numpy()
        if s.shape[0] == 1:  # ggml_n_dims drops trailing 1s: [n] and [1]
            arr = arr.reshape(-1)
        else:
            cnt = cnt.reshape(-1, 1)
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(arr))
        w.add_tensor(f"{name}.counts", np.ascontiguousarray(cnt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
