"""The library side of `gemmaquant compare`: the base's logits (cached) and each artifact's drift against
them on the same chunks, as one JSON-able report (evaluate/drift.py computes; the CLI renders)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import GemmaQuantError
from ..formats.gguf.fidelity import differences
from ..formats.texts import Text, eval_text
from ..model.loading import resolve_dtype
from .artifact import model_info, open_artifact
from . import drift  # drift.compute_base_ref looked up per call (tests replace it to prove the cache is used)
from .drift import FP16_MAX, SHAPE_FIELDS, base_cache_key, check_compatible, compare, load_cached, save_cached
from .perplexity import chunk_tokens, ppl_stats, tokens_needed

Run = Callable[[str, int, Callable[[Callable[[int], None]], Any]], Any]


def _quietly(label: str, total: int, work):
    return work(lambda done: None)


def base_reference(base: str, text: Text, ctx: int, chunks: int | None, dtype, device: str, topk: int,
                   layer_chunks: int, use_cache: bool, run: Run = _quietly, say: Callable[[str], None] | None = None):
    """(BaseRef, base summary dict): from the cache when possible, else computed and cached."""
    key = base_cache_key(base, text.sha256, ctx, chunks, dtype, topk, layer_chunks)
    ref = load_cached(key) if use_cache else None
    if ref is not None:
        if say is not None:
            say(f"base logits from the cache ({key[:12]})")
        return ref, ref.summary
    art = open_artifact(base, dtype, device)
    tokens = _encode(art.tokenizer, text, tokens_needed(ctx, chunks))
    ids = chunk_tokens(tokens, ctx, art.tokenizer.bos_id, chunks, where=text.name)
    ref = run("base", len(ids), lambda p: drift.compute_base_ref(art.model, ids, topk, layer_chunks, p))
    ref.summary = _summary(art)
    ref.summary["text_tokens"] = len(tokens)
    if use_cache:
        save_cached(key, ref)
    return ref, ref.summary


def _encode(tokenizer, text: Text, need: int | None) -> list[int]:
    """BOS + the text's ids, read and tokenized piece by piece until `need` tokens are there."""
    if tokenizer.bos_id is None:
        raise GemmaQuantError(f"{tokenizer.source}: the tokenizer has no BOS token to add")
    return [tokenizer.bos_id, *text.encode(lambda t: tokenizer.encode(t, add_bos=False), need).ids]


def _summary(art) -> dict:
    cfg = art.config
    return {"name": art.name, "path": str(art.path), "kind": art.kind, "size_bytes": art.size_bytes,
            "bpw_linear": art.bpw_linear, "bpw_file": art.bpw_file, "formats": art.formats,
            "config": {"model_type": cfg.model_type, **{f: getattr(cfg, f) for f in SHAPE_FIELDS}}}


def compare_artifacts(base: str, artifacts: list[str], text: Text | Path | str | None = None, ctx: int = 512,
                      chunks: int | None = None, dtype: str = "auto", device: str = "cpu", topk: int = 128,
                      layer_chunks: int = 1, use_cache: bool = True, run: Run = _quietly,
                      say: Callable[[str], None] | None = None) -> dict:
    """The library side of `compare`: a JSON-able report. `text`: a Text, a path, or None for the
    shipped evaluation text. `run(label, n_chunks, work)` calls `work(update)` (the CLI draws a bar from
    `update(chunks_done)`); `say` gets one-line notes (the base's logits came from the cache)."""
    text = text if isinstance(text, Text) else eval_text(text)
    dt = resolve_dtype(dtype, device)
    ref, base_sum = base_reference(base, text, ctx, chunks, dt, device, topk, layer_chunks, use_cache, run, say)
    base_cfg = SimpleNamespace(**base_sum["config"])
    base_ppl, base_err = ppl_stats(ref.nll.reshape(-1))
    report = {"base": {**base_sum, "ppl": base_ppl, "ppl_stderr": base_err, "act_max": ref.act_max,
                       "act_site": ref.act_site,
                       "fp16_overflow_layers": [i for i, v in enumerate(ref.act_max) if not v <= FP16_MAX]},
              **text.to_dict(), "ctx": ctx, "chunks": int(ref.chunks.shape[0]),
              "dtype": str(dt).replace("torch.", ""), "device": device, "topk": topk,
              "kl_method": f"top-{topk} + remainder mass (lower bound of the exact KL)", "artifacts": []}
    base_full = model_info(base)[0]
    for a in artifacts:
        art = open_artifact(a, dt, device)
        check_compatible(base_cfg, art.config, base, a)
        # a GGUF runs as llama.cpp computes it: settings its metadata cannot carry explain part of the Δ
        notes = differences(base_full, art.config, a) if art.kind == "gguf" else []
        for note in notes:
            logging.getLogger("gemmaquant").warning(note)
        d = run(art.name, len(ref.chunks), lambda p, model=art.model: compare(model, ref, p))
        # each artifact's tokenizer re-reads the text, piece by piece, only as far as the chunks go
        same_tok = _encode(art.tokenizer, text, ref.chunks.numel())[: ref.chunks.numel()]
        flat = ref.chunks.reshape(-1).tolist()
        tok_match = all(x == y for i, (x, y) in enumerate(zip(same_tok, flat)) if i % ctx)
        report["artifacts"].append({**_summary(art), **d.to_dict(with_values=True), "tokenizer_match": tok_match,
                                    "notes": notes})
        del art
    return report
