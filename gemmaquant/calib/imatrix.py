"""An importance matrix from our own forward pass, as llama-imatrix computes it.

For every Linear of every decoder layer: Σ x² over all calibration tokens of its input, per input
column, and the token count (the float model's activations; chunks start with BOS). Keyed by GGUF
weight name (`blk.3.ffn_down.weight`), it is what llama-quantize reads from a GGUF imatrix file:
importance = in_sum2 / count.

By default the token windows are calib/data.py's (seeded random BOS-led windows). `llama_chunks`
reproduces llama-imatrix's own chunking instead, for comparing against its output on one text
(benchmarks/bench_imatrix_agreement.py: Pearson >= 0.99 per tensor on the demo model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats.checkpoint import Checkpoint
from ..formats.gguf.imatrix import Imatrix, expert_report, write_imatrix
from ..formats.gguf.names import gguf_name
from .runner import Progress


@dataclass
class ComputedImatrix:
    sums: dict[str, torch.Tensor]  # GGUF weight name -> Σ x² [n_in] float32 (experts: [E, n_in])
    counts: dict[str, int | list[int]]  # tokens seen (experts: tokens routed to each expert)
    dataset: str
    chunks: int
    chunk_size: int

    def to_imatrix(self, path: str = "") -> Imatrix:
        """What llama-quantize reads back: in_sum2 / float(lround(count)) in f32, per expert for the
        `*_exps` tensors, where an expert that saw no token gets importance 1.0 in every column
        (tools/quantize/quantize.cpp load_imatrix), i.e. it is quantized as without an imatrix."""
        imp = {}
        for n, s in self.sums.items():
            c = torch.tensor(self.counts[n], dtype=torch.float32).reshape(-1, 1)
            s = s.float().reshape(c.shape[0], -1)
            imp[n] = torch.where(c > 0, s / c.clamp(min=1), torch.ones_like(s)).reshape(-1)
        return Imatrix(path, imp, [self.dataset], self.chunks, self.chunk_size)

    def describe(self) -> str:
        return f"{self.chunks} chunks × {self.chunk_size} tokens of {self.dataset}"

    def expert_counts(self) -> dict[str, list[int]]:
        """{`blk.N.ffn_gate_up_exps.weight`: tokens routed to each expert} (MoE models; the down
        projection of an expert sees the same tokens)."""
        return {n: list(c) for n, c in self.counts.items() if n.endswith("ffn_gate_up_exps.weight")}

    def expert_report(self) -> str:
        """One line on the experts' token counts, naming the experts that saw none ("" without MoE)."""
        return expert_report(self.expert_counts())

    def save(self, path: str | Path) -> None:
        write_imatrix(path, self.sums, self.counts, datasets=[self.dataset], chunk_count=self.chunks,
                      chunk_size=self.chunk_size)


def llama_chunks(ids: list[int], n_ctx: int, bos_id: int, n_chunks: int | None = None) -> torch.Tensor:
    """Token chunks exactly as llama-imatrix cuts them (tools/imatrix/imatrix.cpp compute_imatrix).

    `ids` is the whole text tokenized WITH the leading BOS (common_tokenize(..., add_special=true)).
    Chunk i is ids[i·n_ctx : (i+1)·n_ctx] with its first token OVERWRITTEN by BOS (not inserted), so
    the text token at each chunk boundary is dropped: chunk i = [BOS] + text[i·n_ctx : i·n_ctx + n_ctx − 1].
    Chunks: len(ids) // n_ctx, or fewer with `n_chunks` (llama-imatrix's --chunks). → int64 [n, n_ctx]
    """
    n_max = len(ids) // n_ctx
    n = n_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_max)
    if n < 1:
        raise ValueError(f"{len(ids)} tokens make no chunk of {n_ctx}")
    out = torch.tensor(ids[: n * n_ctx], dtype=torch.long).view(n, n_ctx).clone()
    out[:, 0] = bos_id
    return out


def compute_imatrix(ckpt: Checkpoint, *, calib: Path | None = None, n_samples: int = 128,
                    seq_len: int = 512, device: str = "cpu", ids: torch.Tensor | None = None,
                    dataset: str | None = None, progress: Progress | None = None) -> ComputedImatrix:
    """`ids` [n, S] (e.g. from `llama_chunks`) replaces the calibration windows; `dataset` names them;
    `progress(done, total, what)` hears of each layer."""
    from .pipeline import calibrate

    if ids is not None:
        n_samples, seq_len = ids.shape
    res = calibrate(ckpt, "q8_0", imatrix=True, calib_path=calib, n_samples=n_samples, seq_len=seq_len,
                    ids=ids, device=device, progress=progress)
    gen = ckpt.config.generation
    sums, counts = {}, {}
    for linear, (s, c) in res.imatrix.items():
        name = gguf_name(linear if linear.endswith("_proj") and ".experts." in linear else linear + ".weight", gen)
        sums[name], counts[name] = s, [int(x) for x in c] if isinstance(c, list) else int(c)
    dataset = dataset or (str(calib) if calib else "gemmaquant-default-calibration")
    dense = [c for c in counts.values() if isinstance(c, int)]
    chunks = max(1, round(dense[0] / seq_len)) if dense else 0
    return ComputedImatrix(sums, counts, dataset, chunks, seq_len)
