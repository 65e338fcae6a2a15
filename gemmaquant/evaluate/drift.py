"""Drift of a quantized artifact against its base model, on the same token chunks.

Per scored token (llama-perplexity's chunks: the second half of each chunk is scored):
  * KL(base ‖ artifact) of the next-token distributions, mean and 99th percentile;
  * top-1 agreement (argmax equal); ppl of both and Δppl % = 100 · (ppl_a / ppl_b − 1).
Per decoder layer, on the first `layer_chunks` chunks:
  * relative output error: layer i of the artifact is fed the *base's* input hidden state h_i, and
    ‖L_a(h_i) − h_{i+1}‖ / ‖h_{i+1} − h_i‖ (summed over tokens) compares its update with the base's,
    so the error of each layer is measured alone, without what earlier layers accumulated;
Per decoder layer, on all chunks: the largest |activation| over the residual stream and every Linear's
input and output, flagged where it passes float16's largest finite value (65504): an fp16 engine
(vLLM refuses fp16 for Gemma 2/3 for this reason) would overflow there.

Base reference and its cache. The base's distribution is stored as its top-K log-probabilities
(K = 128 by default) plus the target NLL, not the full 262k-entry distribution (47 chunks × 256 ×
262144 × 2 B would be 6 GB). KL is then computed over the partition {top-K tokens, the rest}:
    KL ≈ Σ_{i∈K} p_i (log p_i − log q_i) + (1 − P_K) · (log(1 − P_K) − log(1 − Q_K))
with P_K, Q_K the base's and artifact's mass on the base's top K. This is a lower bound of the exact
KL (coarse-graining never increases divergence) and misses only the divergence *within* the tail,
weighted by the tail mass (1 − P_K). Top-1 agreement and ppl are exact. The reference is cached in
the gemmaquant cache dir keyed by (base path and mtime, text hash, ctx, chunks, dtype, K).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import GemmaQuantError
from ..formats.hub import cache_dir
from .perplexity import chunk_nll, ppl_stats
from ..model.qlinear import QuantLinear

FP16_MAX = 65504.0
CACHE_VERSION = 1
Progress = Callable[[int], None] | None


# -- pure maths -----------------------------------------------------------------------------------
def topk_kl(base_topk_logp: torch.Tensor, base_topk_idx: torch.Tensor, art_logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(base ‖ artifact) over the partition {base top-K, rest}, float64 [S].
    base_topk_logp/idx [S, K]; art_logp [S, V] log-softmax of the artifact."""
    lp = base_topk_logp.double()
    lq = art_logp.gather(-1, base_topk_idx.long()).double()
    p = lp.exp()
    kl = (p * (lp - lq)).sum(-1)
    # Below 1e-6 the remainder is float32 rounding of log-probs summing to 1, not probability mass.
    rest_p = (1.0 - p.sum(-1)).clamp_min(0.0)
    rest_q = (1.0 - lq.exp().sum(-1)).clamp_min(1e-12)
    tail = torch.where(rest_p > 1e-6, rest_p * (torch.log(rest_p.clamp_min(1e-12)) - torch.log(rest_q)),
                       torch.zeros_like(rest_p))
    return (kl + tail).clamp_min(0.0)


# -- one forward pass with statistics --------------------------------------------------------------
class _ActMax:
    """Forward hooks recording max |x| of every Linear input/output of one decoder layer."""

    def __init__(self, layer: nn.Module):
        self.best, self.site = 0.0, ""
        self.handles = []
        for name, m in layer.named_modules():
            if isinstance(m, (nn.Linear, QuantLinear)):
                self.handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, inp, out):
            self.see(inp[0], name + " in")
            self.see(out, name + " out")
        return hook

    def see(self, x: torch.Tensor, site: str):
        v = x.detach().abs().max().float().item()
        if not v <= self.best:  # NaN/Inf count as the largest
            self.best, self.site = v, site

    def remove(self):
        for h in self.handles:
            h.remove()


def run_with_stats(model, ids: torch.Tensor, first: int, keep_hidden: bool = False
                   ) -> tuple[torch.Tensor, list[tuple[float, str]], list[torch.Tensor] | None]:
    """ids [1, S] → (logits [S - first, V], per-layer (max |act|, site), hidden states h_0..h_L
    [S, hidden] float32 if keep_hidden)."""
    h, ctx = model.prepare(ids)
    hidden = [h[0].float().cpu()] if keep_hidden else None
    stats = []
    for layer in model.layers:
        rec = _ActMax(layer)
        try:
            h = layer(h, ctx)
        finally:
            rec.remove()
        rec.see(h, "residual")
        stats.append((rec.best, rec.site))
        if keep_hidden:
            hidden.append(h[0].float().cpu())
    return model.head(h[:, first:])[0], stats, hidden


# -- the base reference ----------------------------------------------------------------------------
@dataclass
class BaseRef:
    chunks: torch.Tensor  # [n, ctx] token ids (BOS first)
    topk_logp: torch.Tensor  # [n, S, K] float32, S = ctx - 1 - ctx/2 scored positions
    topk_idx: torch.Tensor  # [n, S, K] int32
    nll: torch.Tensor  # [n, S] float64
    hidden: list[torch.Tensor]  # per layer-chunk [L+1, ctx, hidden] float32
    act_max: list[float]  # per layer
    act_site: list[str]
    summary: dict = field(default_factory=dict)  # the base's name, size, config (set by the caller)

    def to_state(self) -> dict:
        return {"v": CACHE_VERSION, "chunks": self.chunks, "topk_logp": self.topk_logp, "topk_idx": self.topk_idx,
                "nll": self.nll, "hidden": self.hidden, "act_max": torch.tensor(self.act_max, dtype=torch.float64),
                "act_site": json.dumps(self.act_site), "summary": json.dumps(self.summary)}

    @classmethod
    def from_state(cls, s: dict) -> "BaseRef":
        return cls(s["chunks"], s["topk_logp"], s["topk_idx"], s["nll"], list(s["hidden"]),
                   s["act_max"].tolist(), json.loads(s["act_site"]), json.loads(s["summary"]))


def compute_base_ref(model, chunks: torch.Tensor, topk: int = 128, layer_chunks: int = 1,
                     progress: Progress = None) -> BaseRef:
    n, ctx = chunks.shape
    first = ctx // 2
    lps, idxs, nlls, hidden = [], [], [], []
    act = [(0.0, "")] * len(model.layers)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for c in range(n):
            ids = chunks[c:c + 1].to(device)
            logits, stats, hs = run_with_stats(model, ids, first, keep_hidden=c < layer_chunks)
            logp = torch.log_softmax(logits[:-1].float(), -1)
            v, i = logp.topk(topk, dim=-1)
            lps.append(v.cpu())
            idxs.append(i.to(torch.int32).cpu())
            nlls.append(chunk_nll(logits[:-1], ids[0, first + 1:]).cpu())
            if hs is not None:
                hidden.append(torch.stack(hs))
            act = [a if a[0] >= s[0] else s for a, s in zip(act, stats)]
            if progress:
                progress(c + 1)
    return BaseRef(chunks, torch.stack(lps), torch.stack(idxs), torch.stack(nlls), hidden,
                   [a[0] for a in act], [a[1] for a in act])


def base_cache_key(base: str, text_sha256: str, ctx: int, n_chunks: int | None, dtype: torch.dtype, topk: int,
                   layer_chunks: int) -> str:
    """The cache name of a base's logits. `text_sha256`: texts.Text.sha256, the sha256 of the text's
    bytes (the same value the key always held, so earlier cache entries stay valid)."""
    p = Path(base).expanduser()
    if p.exists():
        files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
        ident = [str(p.resolve())] + [f"{f.name}:{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in files]
    else:  # 'demo' or a hub id: the name is the identity
        ident = [base]
    key = {"v": CACHE_VERSION, "base": ident, "text": text_sha256, "ctx": ctx,
           "chunks": n_chunks, "dtype": str(dtype), "topk": topk, "layer_chunks": layer_chunks}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def load_cached(key: str) -> BaseRef | None:
    path = cache_dir() / "drift" / f"base-{key}.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
        return BaseRef.from_state(state) if state.get("v") == CACHE_VERSION else None
    except Exception:  # a damaged cache entry is recomputed, never trusted
        return None


def save_cached(key: str, ref: BaseRef) -> Path:
    d = cache_dir() / "drift"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"base-{key}.pt"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(ref.to_state(), tmp)
    os.replace(tmp, path)
    return path


# -- comparing one artifact -------------------------------------------------------------------------
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim")


def check_compatible(base_cfg, art_cfg, base: str, artifact: str) -> None:
    """Refuse an artifact of another model than the base (vocab or shape mismatch)."""
    if base_cfg.model_type != art_cfg.model_type:
        raise GemmaQuantError(f"{artifact} is a {art_cfg.model_type} model but {base} is {base_cfg.model_type}: "
                              "not a quantization of the base")
    for f in SHAPE_FIELDS:
        a, b = getattr(art_cfg, f), getattr(base_cfg, f)
        if a != b:
            raise GemmaQuantError(f"{artifact} is not a quantization of {base}: {f} {a} vs {b}")


@dataclass
class Drift:
    ppl: float
    ppl_stderr: float
    base_ppl: float
    delta_ppl_pct: float
    kl_mean: float
    kl_p99: float
    top1: float
    tokens: int
    layer_rel_error: list[float]
    act_max: list[float]
    act_site: list[str]
    fp16_overflow_layers: list[int] = field(default_factory=list)
    kl_values: list[float] = field(default_factory=list, repr=False)  # per token, for plots

    def to_dict(self, with_values: bool = False) -> dict:
        d = asdict(self)
        if not with_values:
            d.pop("kl_values")
        return d


def compare(model, ref: BaseRef, progress: Progress = None) -> Drift:
    """Run the artifact on the base's chunks and measure its drift."""
    n, ctx = ref.chunks.shape
    first = ctx // 2
    device = next(model.parameters()).device
    kls, agree, nlls = [], [], []
    act = [(0.0, "")] * len(model.layers)
    with torch.inference_mode():
        for c in range(n):
            ids = ref.chunks[c:c + 1].to(device)
            logits, stats, _ = run_with_stats(model, ids, first)
            logp = torch.log_softmax(logits[:-1].float(), -1).cpu()
            kls.append(topk_kl(ref.topk_logp[c], ref.topk_idx[c], logp))
            agree.append(logp.argmax(-1) == ref.topk_idx[c, :, 0].long())
            nlls.append(chunk_nll(logits[:-1], ids[0, first + 1:]).cpu())  # as the base's
            act = [a if a[0] >= s[0] else s for a, s in zip(act, stats)]
            if progress:
                progress(c + 1)
        rel = layer_errors(model, ref)
    kl = torch.cat(kls)
    ppl, err = ppl_stats(torch.cat(nlls))
    base_ppl, _ = ppl_stats(ref.nll.reshape(-1))
    amax = [a[0] for a in act]
    return Drift(ppl=ppl, ppl_stderr=err, base_ppl=base_ppl, delta_ppl_pct=100.0 * (ppl / base_ppl - 1.0),
                 kl_mean=kl.mean().item(), kl_p99=torch.quantile(kl, 0.99).item(),
                 top1=torch.cat(agree).double().mean().item(), tokens=kl.numel(), layer_rel_error=rel,
                 act_max=amax, act_site=[a[1] for a in act],
                 fp16_overflow_layers=[i for i, v in enumerate(amax) if not v <= FP16_MAX],
                 kl_values=kl.float().tolist())


def layer_errors(model, ref: BaseRef) -> list[float]:
    """Per layer: ‖L_a(h_i) − h_{i+1}‖ / ‖h_{i+1} − h_i‖ over the cached base hidden states."""
    if not ref.hidden:
        return []
    device = next(model.parameters()).device
    n_layers = len(model.layers)
    num = torch.zeros(n_layers, dtype=torch.float64)
    den = torch.zeros(n_layers, dtype=torch.float64)
    for c, hs in enumerate(ref.hidden):  # [L+1, ctx, hidden] of chunk c
        _, ctx = model.prepare(ref.chunks[c:c + 1].to(device))  # Gemma 4: per-layer inputs of these ids
        for i, layer in enumerate(model.layers):
            out = layer(hs[i:i + 1].to(device, model.dtype), ctx)[0].float().cpu()
            num[i] += (out - hs[i + 1]).double().pow(2).sum()
            den[i] += (hs[i + 1] - hs[i]).double().pow(2).sum()
    return (num / den.clamp_min(1e-300)).sqrt().tolist()
