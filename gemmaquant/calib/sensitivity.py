"""How much each tensor at each GGML type would cost the model's output: an estimate of the KL
divergence from the float model it adds, measured on calibration text in one streaming pass.

Per decoder layer i (one layer resident, the float model's activations h):
* the hooked float pass gives each Linear's input statistics (imatrix Σx²/count, H = XᵀX);
* every candidate type T of tensor t is quantized as llama.cpp would (`ggml.quantize`, with that
  imatrix) and scored by its layer-output error e(t,T) = ||X(W − Ŵ)ᵀ||² = tr(ΔHΔᵀ), on up to
  `max_rows` evenly spaced rows (scaled to all rows: the error is a sum over rows);
* one forward of the layer with t alone at a reference type (Q4_0) turns that into the error of
  the layer's output, `||δ_layer||² ≈ g_t · e(t,T)` (g_t: how much of a Linear's output error reaches
  the residual stream, through norms, attention and the MLP's gate);
* one more forward with all of the layer's tensors at the reference type starts a perturbed copy of
  the residual stream, which the later (float) layers carry to the logits: its KL from the float
  logits over its ||δ_layer||² is the layer's gain G_i.
Then ΔKL(t, T) ≈ G_i · g_t · e(t,T). The tied token embedding gets both of its roles measured: as the
LM head, the KL of the float final states through the quantized table (exact, per type); as the input
embedding, a perturbed stream from the start, scaled by each type's embedding error.

These are second-order estimates (KL is quadratic in small perturbations, and the per-tensor costs
add): good for ranking the choices of `budget.py`, not a replacement for llama-perplexity.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..formats.checkpoint import Checkpoint
from ..numerics.ggml.dequantize import dequantize
from ..numerics.ggml.quantize import quantize
from ..numerics.ggml.types import BLOCK, GGMLType
from ..formats.gguf.names import gguf_name
from ..model.loading import load_layer
from ..model.gemma import RMSNorm, embed_scale, make_layer_context
from .ggml_calibrate import imatrix_of
from .ggml_gptq import single_thread
from .runner import embed_ids
from .stats import INPUT_OF, attach

T = GGMLType
# Types the budget chooses from, by increasing size (bits per weight in brackets).
CANDIDATES = (T.Q2_K, T.Q3_K, T.IQ3_S, T.IQ4_XS, T.Q4_0, T.IQ4_NL, T.Q4_K, T.Q4_1, T.Q5_0, T.Q5_K, T.Q5_1,
              T.Q6_K, T.Q8_0)
# What a size budget chooses from by default: our IQ3_S search (exact emulation of llama.cpp's grid
# search) is two orders of magnitude slower than the other quantizers, too slow to try on every tensor.
BUDGET_TYPES = tuple(t for t in CANDIDATES if t != T.IQ3_S)
REFERENCE = T.Q4_0  # every Gemma row length is a multiple of its block of 32


def candidates(ncols: int, allowed=CANDIDATES) -> list[GGMLType]:
    """The candidate types a row of `ncols` weights can use without llama.cpp's fallback."""
    return [t for t in allowed if ncols % BLOCK[t][0] == 0]


@dataclass
class TensorSensitivity:
    name: str  # GGUF name
    shape: tuple[int, int]
    kl: dict[GGMLType, float]  # estimated ΔKL (nats/token) per candidate type
    detail: str = ""


@dataclass
class SensitivityReport:
    tensors: dict[str, TensorSensitivity] = field(default_factory=dict)
    layer_gain: list[float] = field(default_factory=list)  # G_i
    tokens: int = 0
    kl_tokens: int = 0
    seconds: float = 0.0


def _rows(n: int, max_rows: int) -> torch.Tensor:
    step = max(1, math.ceil(n / max_rows))
    return torch.arange(0, n, step)


def _quantized(W: torch.Tensor, t: GGMLType, imatrix: torch.Tensor | None) -> torch.Tensor:
    with single_thread():
        return dequantize(quantize(W, t, imatrix), t, tuple(W.shape))


def _linear_error(W: torch.Tensor, H: torch.Tensor, t: GGMLType, imatrix, max_rows: int) -> float:
    rows = _rows(W.shape[0], max_rows)
    Ws = W[rows]
    D = (Ws - _quantized(Ws, t, imatrix)).double()
    return float(((D @ H) * D).sum()) * W.shape[0] / len(rows)


class _Head:
    """The final norm and the (tied) LM head, with optional final soft-cap; KL against the float logits
    over the `kl` positions of each sample, in chunks of positions."""

    def __init__(self, ckpt: Checkpoint, kl_pos: torch.Tensor, chunk: int = 128):
        cfg = ckpt.config
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        with torch.no_grad():
            self.norm.weight.copy_(ckpt.tensor("model.norm.weight").float())
        self.tied = "lm_head.weight" not in ckpt.names()
        name = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        self.W = ckpt.tensor(name).float()
        self.cap = cfg.final_logit_softcapping
        self.pos, self.chunk = kl_pos, chunk

    def _logp(self, h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.norm(h), W)
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return torch.log_softmax(logits.double(), dim=-1)

    def kl(self, h_ref: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[float]:
        """Mean KL(float || q) per pair (perturbed final states, head table or None for the float one)."""
        href = h_ref[:, self.pos].reshape(-1, h_ref.shape[-1])
        flat = [(h[:, self.pos].reshape(-1, h.shape[-1]), W) for h, W in pairs]
        tot = [0.0] * len(pairs)
        for a in range(0, href.shape[0], self.chunk):
            p = self._logp(href[a:a + self.chunk], self.W)
            pe = p.exp()
            for k, (h, W) in enumerate(flat):
                q = self._logp(h[a:a + self.chunk], self.W if W is None else W)
                tot[k] += float((pe * (p - q)).sum())
        return [t / href.shape[0] for t in tot]


def measure_sensitivity(ckpt: Checkpoint, ids: torch.Tensor, *, max_rows: int = 256, kl_positions: int = 64,
                        batch_size: int = 4, embed_types=CANDIDATES, types=CANDIDATES,
                        progress=None) -> SensitivityReport:
    """Estimated ΔKL of every quantizable tensor at every candidate type (module doc).

    ids [n, S]: calibration windows; the KL is taken on the last `kl_positions` positions of each.
    `progress(done, total, what)` is called per layer."""
    t0 = time.perf_counter()
    cfg = ckpt.config
    gen = cfg.generation
    n, S = ids.shape
    rep = SensitivityReport(tokens=n * S)
    kl_pos = torch.arange(max(0, S - kl_positions), S)
    rep.kl_tokens = n * len(kl_pos)
    head = _Head(ckpt, kl_pos)
    with torch.no_grad():
        h = embed_ids(ckpt, ids)
        ctx = make_layer_context(cfg, S, torch.device("cpu"), torch.float32)
        # token_embd as input embedding: the used rows quantized (row-local, no imatrix: llama-imatrix
        # has no entry for it), one perturbed stream at the reference type
        emb_name = "model.embed_tokens.weight"
        table = ckpt.tensor(emb_name)
        used, inv = torch.unique(ids, return_inverse=True)
        rows = table[used].float()
        scale = embed_scale(cfg, torch.float32)
        emb_types = candidates(cfg.hidden_size, embed_types)
        emb_err = {}
        emb_delta_ref = None
        for t in emb_types:
            d = (_quantized(rows, t, None) - rows)[inv] * scale
            emb_err[t] = float((d.double() ** 2).sum())
            if t == REFERENCE:
                emb_delta_ref = d
        streams: list[torch.Tensor] = [h + emb_delta_ref]  # stream 0: embedding; stream i+1: layer i
        layer_err: list[float] = []
        infos: dict[str, tuple] = {}
        for i in range(cfg.num_hidden_layers):
            layer = load_layer(ckpt, i)
            stats, handles = attach(layer, f"model.layers.{i}.", {"sum_sq", "xtx"})
            out = torch.empty_like(h)
            try:
                for b in range(0, n, batch_size):
                    out[b:b + batch_size] = layer(h[b:b + batch_size], ctx)
            finally:
                for hd in handles:
                    hd.remove()
            for k in range(len(streams)):
                streams[k] = _run(layer, streams[k], ctx, batch_size)
            originals = {}
            for sfx in INPUT_OF:  # every decoder-layer Linear, in order
                hf = f"model.layers.{i}.{sfx}"
                st = stats[hf]
                lin = layer.get_submodule(sfx)
                W = lin.weight.detach().to(torch.bfloat16).float()
                H = st.xtx.double()
                imat = imatrix_of(st.sum_sq, st.count)
                errs = {t: _linear_error(W, H, t, imat, max_rows) for t in candidates(W.shape[1], types)}
                Wref = _quantized(W, REFERENCE, imat)
                originals[sfx] = (lin, W, Wref)
                lin.weight.copy_(Wref)
                d_layer = float(((_run(layer, h, ctx, batch_size) - out).double() ** 2).sum())
                lin.weight.copy_(W)
                g = d_layer / max(errs[REFERENCE], 1e-30)
                infos[gguf_name(hf + ".weight", gen)] = (i, tuple(W.shape), errs, g)
            for lin, _, Wref in originals.values():
                lin.weight.copy_(Wref)
            pert = _run(layer, h, ctx, batch_size)
            layer_err.append(float(((pert - out).double() ** 2).sum()))
            streams.append(pert)
            h = out
            del layer, stats
            if progress:
                progress(i + 1, cfg.num_hidden_layers, f"layer {i}")
        # the head: every perturbed stream through the float head, then the float final states
        # through each quantized table (one table at a time: 0.7 GB each for Gemma 3's vocabulary)
        kls = head.kl(h, [(s_, None) for s_ in streams])
        head_kl = {t: head.kl(h, [(h, _quantized(head.W, t, None))])[0] for t in candidates(head.W.shape[1], embed_types)}
    g_emb = kls[0] / max(emb_err[REFERENCE], 1e-30)
    rep.layer_gain = [kls[1 + i] / max(layer_err[i], 1e-30) for i in range(cfg.num_hidden_layers)]
    for name, (i, shape, errs, g) in infos.items():
        G = rep.layer_gain[i]
        rep.tensors[name] = TensorSensitivity(name, shape, {t: G * g * e for t, e in errs.items()},
                                              f"layer gain {G:.3g}, tensor gain {g:.3g}")
    emb = {t: g_emb * e for t, e in emb_err.items()}
    if head.tied:
        emb = {t: v + head_kl[t] for t, v in emb.items()}
        why = f"input gain {g_emb:.3g}; as the tied LM head, KL measured per type"
    else:
        rep.tensors["output.weight"] = TensorSensitivity("output.weight", tuple(head.W.shape), head_kl,
                                                         "LM head: KL measured per type")
        why = f"input gain {g_emb:.3g}"
    rep.tensors["token_embd.weight"] = TensorSensitivity("token_embd.weight", tuple(table.shape), emb, why)
    rep.seconds = time.perf_counter() - t0
    return rep


def _run(layer, h, ctx, batch_size):
    out = torch.empty_like(h)
    for b in range(0, h.shape[0], batch_size):
        out[b:b + batch_size] = layer(h[b:b + batch_size], ctx)
    return out
