"""An importance matrix from our own forward pass, as llama-imatrix computes it.

For every Linear of every decoder layer: Σ x² over all calibration tokens of its input, per input
column, and the token count (the float model's activations; chunks start with BOS). Keyed by GGUF
weight name (`blk.3.ffn_down.weight`), it is what llama-quantize reads from a GGUF imatrix file:
importance = in_sum2 / count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .gguf.imatrix_io import Imatrix, write_imatrix
from .gguf.names import gguf_name


@dataclass
class ComputedImatrix:
    sums: dict[str, torch.Tensor]  # GGUF weight name -> Σ x² [n_in] float32
    counts: dict[str, int]
    dataset: str
    chunks: int
    chunk_size: int

    def to_imatrix(self, path: str = "") -> Imatrix:
        # llama-quantize: in_sum2 / float(lround(count)) in f32
        imp = {n: (s.float() / float(round(self.counts[n]))) for n, s in self.sums.items()}
        return Imatrix(path, imp, [self.dataset], self.chunks, self.chunk_size)

    def describe(self) -> str:
        return f"{self.chunks} chunks × {self.chunk_size} tokens of {self.dataset}"

    def save(self, path: str | Path) -> None:
        write_imatrix(path, self.sums, self.counts, datasets=[self.dataset], chunk_count=self.chunks,
                      chunk_size=self.chunk_size)


def compute_imatrix(ckpt: Checkpoint, *, calib: Path | None = None, n_samples: int = 128,
                    seq_len: int = 512, device: str = "cpu") -> ComputedImatrix:
    from .calib.pipeline import calibrate

    res = calibrate(ckpt, "q8_0", imatrix=True, calib_path=calib, n_samples=n_samples, seq_len=seq_len,
                    device=device, progress=True)
    gen = ckpt.config.generation
    sums, counts = {}, {}
    for linear, (s, c) in res.imatrix.items():
        name = gguf_name(linear + ".weight", gen)
        sums[name], counts[name] = s, int(c)
    dataset = str(calib) if calib else "gemmaquant-default-calibration"
    chunks = max(1, round(next(iter(counts.values())) / seq_len)) if counts else 0
    return ComputedImatrix(sums, counts, dataset, chunks, seq_len)
