"""Open a model for evaluation and run perplexity on it (the library side of `gemmaquant eval`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..formats.checkpoint import Checkpoint
from ..formats.checkpoint import resolve_model
from ..errors import GemmaQuantError
from ..model.loading import load_model, resolve_dtype
from ..model.gemma import Gemma
from .perplexity import PerplexityResult, chunk_tokens, perplexity, tokens_needed
from ..formats.texts import Text, eval_text


@dataclass
class EvalModel:
    model: Gemma
    tokenizer: object  # gemmaquant.formats.tokenizer.Tokenizer
    device: str
    name: str

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def chunks(self, text: Text | str | Path | None, ctx: int, n_chunks: int | None) -> torch.Tensor:
        """`text`: a Text, a path (checked and hashed first), or None for the shipped evaluation text.
        The text is read in pieces and tokenized only as far as n_chunks need."""
        src = text if isinstance(text, Text) else eval_text(text)
        if self.tokenizer.bos_id is None:
            raise GemmaQuantError(f"{self.tokenizer.source}: the tokenizer has no BOS token to add")
        # llama-perplexity tokenizes with BOS and without parsing special-token text
        got = src.encode(lambda t: self.tokenizer.encode(t, add_bos=False, parse_special=False),
                         need=tokens_needed(ctx, n_chunks))
        tokens = [self.tokenizer.bos_id, *got.ids]
        vocab = self.model.cfg.vocab_size
        if tokens and max(tokens) >= vocab:
            raise GemmaQuantError(f"{self.name}: the tokenizer produced id {max(tokens)} but the model has "
                                  f"{vocab} embedding rows (tokenizer of another model?)")
        return chunk_tokens(tokens, ctx, self.tokenizer.bos_id, n_chunks, where=src.name)

    def logits(self, ids: torch.Tensor, first: int = 0) -> torch.Tensor:
        return self.model(ids.to(self.device), logits_from=first)

    def perplexity(self, chunks: torch.Tensor, progress: Callable[[int], None] | None = None) -> PerplexityResult:
        return perplexity(self.logits, chunks, progress)


def open_for_eval(model: str, dtype: str = "auto", device: str = "cpu") -> EvalModel:
    """MODEL: an HF directory, repo id or 'demo' (dense), a `.gguf` file (any Gemma 1/2/3 GGUF,
    llama.cpp's included) or a compressed-tensors directory; quantized weights stay packed."""
    from .artifact import artifact_kind, open_artifact

    dt = resolve_dtype(dtype, device)
    if artifact_kind(model) != "hf":
        art = open_artifact(model, dt, device)
        return EvalModel(model=art.model, tokenizer=art.tokenizer, device=device, name=art.name)
    from ..formats.tokenizer import load_tokenizer

    ckpt: Checkpoint = resolve_model(model)
    tok = load_tokenizer(ckpt.path, rows=ckpt.config.vocab_size)
    m = load_model(ckpt, dt, device)
    return EvalModel(model=m, tokenizer=tok, device=device, name=ckpt.name)
