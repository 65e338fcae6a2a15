"""Perplexity by llama-perplexity's method, so our numbers compare with llama.cpp's published ones.

The text is tokenized once with BOS; it is cut into non-overlapping chunks of `ctx` tokens; the first
token of every chunk is replaced by BOS; the first half of each chunk is context only and the tokens
of the second half are scored (logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1,
so ctx - 1 - ctx/2 tokens per chunk). The standard error is llama.cpp's: sqrt(var(nll)/(n-1)) · ppl.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import GemmaQuantError


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    nll: float  # mean negative log-likelihood per scored token
    tokens_scored: int
    tokens_processed: int
    chunks: int
    ctx: int
    seconds: float
    chunk_ppl: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Processed (not only scored) tokens per second, as llama.cpp's prompt-eval rate."""
        return self.tokens_processed / self.seconds if self.seconds else float("nan")

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "ppl_stderr": self.ppl_stderr, "nll": self.nll,
                "tokens_scored": self.tokens_scored, "tokens_processed": self.tokens_processed,
                "chunks": self.chunks, "ctx": self.ctx, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_second}


def tokens_needed(ctx: int, n_chunks: int | None) -> int | None:
    """How many tokens `chunk_tokens` can use: n chunks, and at least the two chunks llama-perplexity
    requires (None: all of them)."""
    return None if n_chunks is None or n_chunks <= 0 else max(n_chunks, 2) * ctx


def chunk_tokens(tokens: list[int], ctx: int, bos_id: int, n_chunks: int | None,
                 where: str = "text") -> torch.Tensor:
    """[n_chunks, ctx] token ids, first of each replaced by BOS."""
    if ctx < 8 or ctx % 2:
        raise GemmaQuantError(f"--ctx {ctx}: must be an even number >= 8")
    available = len(tokens) // ctx
    if available < 1 or len(tokens) < 2 * ctx:
        raise GemmaQuantError(
            f"{where}: {len(tokens)} tokens is too short for perplexity at ctx {ctx} "
            f"(llama-perplexity needs at least {2 * ctx})"
        )
    n = available if n_chunks is None or n_chunks <= 0 else min(n_chunks, available)
    t = torch.tensor(tokens[: n * ctx], dtype=torch.long).view(n, ctx).clone()
    t[:, 0] = bos_id
    return t


def chunk_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in float64 (logits [..., V] of any float dtype)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()


def perplexity(logits_fn: Callable[[torch.Tensor, int], torch.Tensor], chunks: torch.Tensor,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """`logits_fn(ids [1, ctx], first) -> logits [1, ctx - first, V]` for one chunk."""
    n, ctx = chunks.shape
    first = ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    chunk_ppl = []
    t0 = time.perf_counter()
    for i in range(n):
        ids = chunks[i:i + 1]
        with torch.inference_mode():
            logits = logits_fn(ids, first)[0, :-1]  # positions first .. ctx-2
        nll = chunk_nll(logits, ids[0, first + 1:])
        nll_sum += nll.sum().item()
        nll2_sum += (nll * nll).sum().item()
        count += nll.numel()
        chunk_ppl.append(math.exp(nll_sum / count))
        if progress:
            progress(i + 1)
    seconds = time.perf_counter() - t0
    mean = nll_sum / count
    ppl, stderr = ppl_from_sums(nll_sum, nll2_sum, count)
    return PerplexityResult(ppl=ppl, ppl_stderr=stderr, nll=mean, tokens_scored=count,
                            tokens_processed=n * ctx, chunks=n, ctx=ctx, seconds=seconds,
                            chunk_ppl=chunk_ppl)


def ppl_from_sums(nll_sum: float, nll2_sum: float, count: int) -> tuple[float, float]:
    """(ppl, stderr) from Σnll, Σnll² and the token count: llama-perplexity's formula,
    stderr = sqrt(var(nll) / (n - 1)) · ppl. A broken model (mean NLL past exp's range) reports inf."""
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    ppl = math.exp(mean) if mean < 700 else math.inf
    return ppl, (math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0)


def ppl_stats(nll: torch.Tensor) -> tuple[float, float]:
    """(ppl, stderr) of per-token NLLs (drift's reports), by the same formula as `perplexity`."""
    nll = nll.double()
    return ppl_from_sums(nll.sum().item(), (nll * nll).sum().item(), nll.numel())
