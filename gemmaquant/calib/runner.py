"""Layer-by-layer calibration driver: only the embedding rows in use and ONE decoder layer are resident.

    ids [n, S] ──embed──► h [n, S, hidden] (float32, kept on the host for all samples)
    for each layer i:   load_layer(i) → hooked pass over h in mini-batches (statistics)
                        → on_layer(i, layer, stats) quantizes / folds the layer in place
                        → h = layer(h)   (the *modified* layer when `sequential`, as GPTQ does,
                                          so layer i+1 is calibrated on what it will really see)
                        → the layer is freed
With `sequential=False` the outputs come from the float layer in the statistics pass itself (one pass
per layer), which is what llama-imatrix and SmoothQuant's float statistics want.
The passes give the same values on any thread count (`threads.py`): each runs on one torch thread, the
Linears' products and the statistics' XᵀX as jobs on all of them (on the CPU).
With `sequential=True` the buffer of the next layer's input exists only during the pass that writes it:
the statistics pass and `on_layer` (the rounding, where a big layer's peak is) see one [n, S, hidden]
buffer, not two (Gemma 4 31B at the default 128 × 512 tokens: 1.4 GB each).
With `float_target=True` (sequential only) a second stream h_f runs through the float layers beside the
quantized stream h; each mini-batch goes through the (still float) layer twice, first from h_f, storing
every hooked Linear's input, then from h with the statistics hooks, so "xfx" can pair both inputs of
the same token. One more pass per layer and one more [n, S, hidden] buffer.
`progress(done, total, what)` hears of each layer (layers done of all, the one under way); the CLI
draws it (cli/progress.py), nothing here renders.

Gemma 4: each mini-batch keeps its own K/V of the layers that KV-shared layers read (`LayerContext.kv`
per batch and per stream, set by the last pass over the producer: the quantized one when sequential);
per-layer inputs are computed for one layer at a time from the kept scaled embeddings (the whole
[n, S, L, P] tensor of E2B would be 2.3 GB for 128 × 512 tokens); media placeholder ids of a
Gemma4ForConditionalGeneration checkpoint embed as pad, as the model does.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.checkpoint import Checkpoint
from ..errors import GemmaQuantError
from ..model.loading import load_layer
from ..model.gemma import DecoderLayer, RMSNorm, embed_scale, make_layer_context
from ..model.gemma4_blocks import combine_per_layer
from .stats import InputStats, Pairing, attach
from .threads import linear, single_thread

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


def model_ids(ckpt: Checkpoint, ids: torch.Tensor) -> torch.Tensor:
    """The ids the text model embeds (Gemma4ForConditionalGeneration: media placeholders as pad)."""
    cfg = ckpt.config
    if cfg.media_token_ids and cfg.pad_token_id is not None:
        ids = torch.where(torch.isin(ids, torch.tensor(cfg.media_token_ids)), cfg.pad_token_id, ids)
    return ids


class PerLayerInputs:
    """Gemma 4's per-layer inputs, one layer's slice at a time (`combine_per_layer`)."""

    def __init__(self, ckpt: Checkpoint, ids: torch.Tensor, x0: torch.Tensor, dtype: torch.dtype, device):
        cfg = ckpt.config
        self.cfg, self.ids, self.x0, self.dtype, self.device = cfg, ids, x0, dtype, device
        self.table = ckpt.tensor("model.embed_tokens_per_layer.weight")
        self.proj = ckpt.tensor("model.per_layer_model_projection.weight")
        self.norm = RMSNorm(cfg.hidden_size_per_layer_input, cfg.rms_norm_eps, cfg.norm_unit_offset).to(device)
        with torch.no_grad():
            self.norm.weight.copy_(ckpt.tensor("model.per_layer_projection_norm.weight").to(dtype))
        self.norm.to(dtype)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(table columns: a view of the mapped table, projection rows in the compute dtype) of layer i."""
        p = self.cfg.hidden_size_per_layer_input
        return self.table[:, i * p:(i + 1) * p], self.proj[i * p:(i + 1) * p].to(self.dtype).to(self.device)

    def batch(self, cols: torch.Tensor, rows: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        tok = F.embedding(self.ids[b0:b1], cols).to(self.dtype).to(self.device)  # only the rows in use
        x0 = self.x0[b0:b1].to(self.device)
        return combine_per_layer(self.cfg, tok, F.linear(x0, rows), self.norm)


class _Batches:
    """Per mini-batch state of one stream: the K/V shared layers read, the per-layer input slice."""

    def __init__(self, ctx, ple: PerLayerInputs | None):
        self.ctx, self.ple, self.kv, self.cur = ctx, ple, {}, None

    def start_layer(self, i: int) -> None:
        self.cur = (i, *self.ple.layer(i)) if self.ple is not None else None

    def context(self, b0: int, b1: int):
        self.ctx.kv = self.kv.setdefault(b0, {})
        if self.cur is not None:
            i, cols, rows = self.cur
            self.ctx.per_layer = self.ple.batch(cols, rows, b0, b1)
            self.ctx.per_layer_first = i
        return self.ctx


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
        ids = model_ids(ckpt, ids)
        h = embed_ids(ckpt, ids, dtype)
        ple = PerLayerInputs(ckpt, ids, h.clone(), dtype, device) if cfg.hidden_size_per_layer_input else None
        ctx = _Batches(make_layer_context(cfg, seq, torch.device(device), dtype), ple)
        ctx_f = _Batches(make_layer_context(cfg, seq, torch.device(device), dtype), ple) if float_target else None
        out = None  # the next layer's input, allocated for the pass that writes it (module doc)
        h_f = h.clone() if float_target else None
        out_f = torch.empty_like(h) if float_target else None
        for done, i in enumerate(layers):
            if progress:
                progress(done, len(layers), f"layer {i}")
            layer = load_layer(ckpt, i, dtype, device)
            if torch.device(device).type == "cpu":
                _linears_by_jobs(layer)
            ctx.start_layer(i)
            if ctx_f is not None:
                ctx_f.start_layer(i)
            pair = Pairing() if float_target else None
            stats, handles = attach(layer, f"model.layers.{i}.", kinds, pair)
            try:
                if float_target:
                    _paired_pass(layer, h_f, out_f, h, ctx_f, ctx, batch_size, device, pair)
                    h_f, out_f = out_f, h_f
                else:
                    if not sequential and out is None:
                        out = torch.empty_like(h)
                    _pass(layer, h, out, ctx, batch_size, device, keep=not sequential)
            finally:
                for hd in handles:
                    hd.remove()
            if on_layer is not None:
                on_layer(i, layer, stats)
            del stats
            if sequential:
                out = torch.empty_like(h)
                _pass(layer, h, out, ctx, batch_size, device, keep=True)
            h, out = out, h
            if sequential:
                out = None  # this layer's input, not read again: not held through the next statistics pass
            del layer
        if progress:
            progress(len(layers), len(layers), "")
    return h


def _linears_by_jobs(layer: DecoderLayer) -> None:
    """Every bias-free nn.Linear of the layer computes by `threads.linear` jobs; its hooks still run
    around it. The class is swapped, not the instance's `forward`: `mod.forward = partial(f, mod)` is a
    reference cycle, which kept each float32 layer alive until Python's gc happened to run: a second
    layer beside the loaded one, 1.8 GiB on the 31B shapes (RESULTS.md §11, fifteenth round)."""
    for mod in layer.modules():
        if type(mod) is nn.Linear and mod.bias is None:
            mod.__class__ = JobLinear


class JobLinear(nn.Linear):
    """An nn.Linear without bias whose product runs as `threads.linear` jobs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def _pass(layer, h, out, ctx: _Batches, batch_size, device, keep: bool) -> None:
    with single_thread():  # the values the same on any thread count (threads.py): products by jobs
        for b in range(0, h.shape[0], batch_size):
            y = layer(h[b:b + batch_size].to(device), ctx.context(b, b + batch_size))
            if keep:
                out[b:b + batch_size] = y.to(out.device)


def _paired_pass(layer, h_f, out_f, h, ctx_f: _Batches, ctx: _Batches, batch_size, device, pair: Pairing) -> None:
    """Per mini-batch: the float stream (hooks store its Linear inputs, its output is kept), then the
    quantized stream (hooks pair its inputs with the stored ones)."""
    with single_thread():  # as `_pass`
        for b in range(0, h.shape[0], batch_size):
            pair.float_pass = True
            out_f[b:b + batch_size] = layer(h_f[b:b + batch_size].to(device),
                                            ctx_f.context(b, b + batch_size)).to(out_f.device)
            pair.float_pass = False
            layer(h[b:b + batch_size].to(device), ctx.context(b, b + batch_size))
