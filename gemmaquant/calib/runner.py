"""Layer-by-layer calibration driver: only the embedding rows in use and ONE decoder layer are resident.

    ids [n, S] ──embed──► h [n, S, hidden] (float32, kept on the host for all samples)
    for each layer i:   load_layer(i) → hooked pass over h in mini-batches (statistics)
                        → on_layer(i, layer, stats) quantizes / folds the layer in place
                        → h = layer(h)   (the *modified* layer when `sequential`, as GPTQ does,
                                          so layer i+1 is calibrated on what it will really see)
                        → the layer is freed
With `sequential=False` the outputs come from the float layer in the statistics pass itself (one pass
per layer), which is what llama-imatrix and SmoothQuant's float statistics want.
With `float_target=True` (sequential only) a second stream h_f runs through the float layers beside the
quantized stream h; each mini-batch goes through the (still float) layer twice, first from h_f, storing
every hooked Linear's input, then from h with the statistics hooks, so "xfx" can pair both inputs of
the same token. One more pass per layer and one more [n, S, hidden] buffer.
`progress(done, total, what)` hears of each layer (layers done of all, the one under way); the CLI
draws it (cli/progress.py), nothing here renders.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..formats.checkpoint import Checkpoint
from ..errors import GemmaQuantError
from ..model.loading import load_layer
from ..model.gemma import DecoderLayer, embed_scale, make_layer_context
from .stats import InputStats, Pairing, attach

# on_layer(index, layer, {full Linear name: stats}) — may modify `layer` in place.
OnLayer = Callable[[int, DecoderLayer, dict[str, InputStats]], None]
# progress(done, total, what): steps done of total, and the one under way ("layer 3"; "" when all are done)
Progress = Callable[[int, int, str], None]


def embed_ids(ckpt: Checkpoint, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ids [n, S] → scaled embeddings [n, S, hidden], as `Gemma.embed` computes them in `dtype`.

    Reads only the rows in use from the memory-mapped table (the 262k-row Gemma 3 table stays on disk).
    """
    table = ckpt.tensor("model.embed_tokens.weight")
    if ids.numel() and (int(ids.max()) >= table.shape[0] or int(ids.min()) < 0):
        raise GemmaQuantError(
            f"{ckpt.path}: the tokenizer produced token id {int(ids.max())}, but the model's vocabulary has "
            f"{table.shape[0]} rows (tokenizer files from another model?)")
    h = F.embedding(ids, table).to(dtype)
    return h * embed_scale(ckpt.config, dtype)


def run_layers(ckpt: Checkpoint, ids: torch.Tensor, *, kinds, on_layer: OnLayer | None = None,
               sequential: bool = True, dtype: torch.dtype = torch.float32, device="cpu",
               batch_size: int = 4, layers: range | None = None, progress: Progress | None = None,
               float_target: bool = False) -> torch.Tensor:
    """Drive calibration over `layers` (default: all); returns the final hidden states [n, S, hidden]."""
    if float_target and not sequential:
        raise ValueError("float_target needs sequential=True (without it both streams are the float one)")
    cfg = ckpt.config
    n, seq = ids.shape
    layers = range(cfg.num_hidden_layers) if layers is None else layers
    with torch.no_grad():
        h = embed_ids(ckpt, ids, dtype)
        ctx = make_layer_context(cfg, seq, torch.device(device), dtype)
        out = torch.empty_like(h)
        h_f = h.clone() if float_target else None
        out_f = torch.empty_like(h) if float_target else None
        for done, i in enumerate(layers):
            if progress:
                progress(done, len(layers), f"layer {i}")
            layer = load_layer(ckpt, i, dtype, device)
            pair = Pairing() if float_target else None
            stats, handles = attach(layer, f"model.layers.{i}.", kinds, pair)
            try:
                if float_target:
                    _paired_pass(layer, h_f, out_f, h, ctx, batch_size, device, pair)
                    h_f, out_f = out_f, h_f
                else:
                    _pass(layer, h, out, ctx, batch_size, device, keep=not sequential)
            finally:
                for hd in handles:
                    hd.remove()
            if on_layer is not None:
                on_layer(i, layer, stats)
            del stats
            if sequential:
                _pass(layer, h, out, ctx, batch_size, device, keep=True)
            h, out = out, h
            del layer
        if progress:
            progress(len(layers), len(layers), "")
    return h


def _pass(layer, h, out, ctx, batch_size, device, keep: bool) -> None:
    for b in range(0, h.shape[0], batch_size):
        y = layer(h[b:b + batch_size].to(device), ctx)
        if keep:
            out[b:b + batch_size] = y.to(out.device)


def _paired_pass(layer, h_f, out_f, h, ctx, batch_size, device, pair: Pairing) -> None:
    """Per mini-batch: the float stream (hooks store its Linear inputs, its output is kept), then the
    quantized stream (hooks pair its inputs with the stored ones)."""
    for b in range(0, h.shape[0], batch_size):
        pair.float_pass = True
        out_f[b:b + batch_size] = layer(h_f[b:b + batch_size].to(device), ctx).to(out_f.device)
        pair.float_pass = False
        layer(h[b:b + batch_size].to(device), ctx)
