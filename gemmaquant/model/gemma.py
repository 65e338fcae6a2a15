"""The built-in Gemma 1/2/3/4 text model: one skeleton, config flags for the generations.

Parameter names are Hugging Face's, so a checkpoint loads by name and exported names match what
vLLM expects. Numerics follow transformers' reference implementation:
  * embeddings are scaled by sqrt(hidden) *rounded to the compute dtype* (bf16: sqrt(640)=25.298 → 25.25);
  * RMSNorm computes x·rsqrt(mean(x²)+eps)·(1+w) in float32 and casts back;
  * RoPE (rotate-half layout) with a separate base for sliding layers (Gemma 3: 10k local, 1M global)
    and linear position scaling on global layers only;
  * queries scaled by query_pre_attn_scalar^-1/2 (Gemma 2 27B: 144, not head_dim);
  * Gemma 2 tanh soft-capping of attention scores (50) and final logits (30);
  * sliding-window causal masks on local layers: key j is visible from query i iff 0 <= i-j < window;
  * Gemma 3 q/k RMSNorm over head_dim before RoPE; Gemma 2/3 sandwich norms around attention and MLP;
  * GeGLU MLP with tanh-approximated GELU; the LM head is the (tied) embedding, or the checkpoint's own
    `lm_head.weight` when it has one (fine-tunes saved untied: using the embedding there computes
    another model);
  * Gemma 4: norms scale by w (not 1 + w), attention scaling 1.0, per-layer head dims (full layers:
    global_head_dim) with proportional RoPE (only the first partial_rotary_factor of the frequency
    pairs rotate), a scale-free norm on values, V = raw K on `attention_k_eq_v` full layers, the last
    `num_kv_shared_layers` layers attending with an earlier layer's K/V (the last non-shared layer of
    their kind), a per-layer `layer_scalar`, and the blocks of gemma4_blocks.py (MoE, PLE).
Every projection is an `nn.Linear` (or a drop-in quantized module) so calibration can hook its input,
and decoder layers can run one at a time (`embed` → `layer_context` → `layers[i]` → `head`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.config import GemmaConfig
from .gemma4_blocks import Experts, Router, per_layer_inputs, rms_norm


def embed_scale(cfg: GemmaConfig, dtype: torch.dtype) -> torch.Tensor:
    """Gemma multiplies embeddings by sqrt(hidden_size), rounded to the compute dtype first, as
    transformers and vLLM do (in bf16, 640**0.5 becomes 25.25, not 25.298...)."""
    return torch.tensor(math.sqrt(cfg.hidden_size), dtype=dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = True):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim))  # Gemma 1-3 store w; the scale is (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.unit_offset:  # Gemma 4: scale w, torch.pow as transformers
            return (rms_norm(x.float(), self.eps) * self.weight.float()).type_as(x)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, factor: float,
                 dtype: torch.dtype, partial: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, head_dim] computed in float32 (as transformers does), then cast to `dtype`.
    `partial` < 1 (Gemma 4's proportional RoPE): only the first int(partial·head_dim/2) frequency
    pairs rotate, with exponents still over the whole head dim; the others get frequency 0."""
    n = int(partial * head_dim // 2)
    inv_freq = 1.0 / (theta ** (torch.arange(0, 2 * n, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))
    inv_freq = torch.cat([inv_freq, inv_freq.new_zeros(head_dim // 2 - n)]) / factor
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class LayerContext:
    """Per-sequence tensors shared by all layers: RoPE tables and masks for both layer kinds."""

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer kind -> (cos, sin) [S, D]
    mask: dict[str, torch.Tensor]  # layer kind -> additive float mask [S, S] (0 / -inf)
    per_layer: torch.Tensor | None = None  # Gemma 4 PLE inputs [B, S, n, P] of this sequence batch
    per_layer_first: int = 0  # the layer per_layer[:, :, 0] belongs to (layer-by-layer calibration: n = 1)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # shared K/V by layer

    def per_layer_input(self, layer: int) -> torch.Tensor:
        if self.per_layer is None:
            raise RuntimeError("a Gemma 4 model with per-layer inputs needs ctx.per_layer (Gemma.prepare)")
        return self.per_layer[:, :, layer - self.per_layer_first]


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.layer_types[layer_idx]
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (cfg.num_attention_heads, cfg.kv_heads_of(layer_idx),
                                                  cfg.head_dim_of(layer_idx))
        self.scaling = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.kv_source = cfg.kv_source(layer_idx)  # != layer_idx: K/V come from that layer (Gemma 4)
        self.v_norm = cfg.generation == 4
        self.stores_kv = any(cfg.kv_source(i) == layer_idx for i in range(cfg.first_kv_shared, cfg.num_hidden_layers))
        h, q_dim, kv_dim = cfg.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        norm = cfg.norm_unit_offset
        self.q_proj = nn.Linear(h, q_dim, bias=False)
        if self.kv_source == layer_idx:
            self.k_proj = nn.Linear(h, kv_dim, bias=False)
            if cfg.has_v_proj(layer_idx):  # else V is the raw K projection (attention_k_eq_v)
                self.v_proj = nn.Linear(h, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, norm)
            if self.kv_source == layer_idx:
                self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, norm)

    def _keys_values(self, x: torch.Tensor, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """K (normed, rotated) and V [B, KV, S, D]; kept in ctx for the layers that share them."""
        if self.kv_source != self.layer_idx:
            if self.kv_source not in ctx.kv:
                raise RuntimeError(f"layer {self.layer_idx} shares the keys/values of layer {self.kv_source}, "
                                   "which has not run on this batch")
            return ctx.kv[self.kv_source]
        B, S, _ = x.shape
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, S, D]
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2) if hasattr(self, "v_proj") else k
        if self.cfg.qk_norm:
            k = self.k_norm(k)
        cos, sin = ctx.rope[self.kind]
        k = k * cos + rotate_half(k) * sin
        if self.v_norm:
            v = rms_norm(v, self.cfg.rms_norm_eps)
        if self.stores_kv:
            ctx.kv[self.layer_idx] = (k, v)
        return k, v

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        if self.cfg.qk_norm:
            q = self.q_norm(q)
        cos, sin = ctx.rope[self.kind]
        q = q * cos + rotate_half(q) * sin
        k, v = self._keys_values(x, ctx)
        mask = ctx.mask[self.kind].to(q.dtype)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if self.softcap is None and not self.v_norm:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        else:  # Gemma 2: cap the raw scores before masking; Gemma 4's unscaled scores are sharp enough
            # that SDPA's accumulation order moves logits by ~2e-5: both softmax in float32 like transformers
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
            if self.softcap is not None:
                scores = torch.tanh(scores / self.softcap) * self.softcap
            probs = torch.softmax((scores + mask).float(), dim=-1).to(q.dtype)
            out = torch.matmul(probs, v)
        out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: GemmaConfig, width: int | None = None):
        super().__init__()
        width = width or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.sandwich = cfg.sandwich_norms
        self.layer_idx = layer_idx
        self.gemma4 = cfg.generation == 4
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg, cfg.intermediate_of(layer_idx))
        h, eps, unit = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset
        self.input_layernorm = RMSNorm(h, eps, unit)
        self.post_attention_layernorm = RMSNorm(h, eps, unit)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(h, eps, unit)
            self.post_feedforward_layernorm = RMSNorm(h, eps, unit)
        if cfg.is_moe:  # beside the dense MLP, on every layer
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps, unit)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps, unit)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps, unit)
        if cfg.hidden_size_per_layer_input:
            p = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(h, p, bias=False)
            self.per_layer_projection = nn.Linear(p, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps, unit)
        if self.gemma4:
            self.layer_scalar = nn.Parameter(torch.ones(1))

    def _gemma4_forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        m = self.mlp(self.pre_feedforward_layernorm(x))
        if hasattr(self, "router"):  # the router and experts read the residual itself
            flat = x.reshape(-1, x.shape[-1])
            weights, idx = self.router(flat)
            moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, idx).reshape(x.shape)
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(moe)
        x = x + self.post_feedforward_layernorm(m)
        if hasattr(self, "per_layer_input_gate"):
            z = F.gelu(self.per_layer_input_gate(x), approximate="tanh") * ctx.per_layer_input(self.layer_idx)
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(z))
        return x * self.layer_scalar

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        if self.gemma4:
            return self._gemma4_forward(x, ctx)
        if not self.sandwich:  # Gemma 1: pre-norm only; post_attention_layernorm feeds the MLP
            x = x + self.self_attn(self.input_layernorm(x), ctx)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class _Body(nn.Module):
    """Holds `embed_tokens`, `layers` and `norm` so that parameter names read `model.…`."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)
        if cfg.hidden_size_per_layer_input:  # Gemma 4 per-layer inputs (PLE)
            lp = cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, lp)
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, lp, bias=False)
            self.per_layer_projection_norm = RMSNorm(cfg.hidden_size_per_layer_input, cfg.rms_norm_eps,
                                                     cfg.norm_unit_offset)


class Gemma(nn.Module):
    """The model. Its embedding and LM head may be swapped for other modules (evaluate/quantized.py puts
    quantized ones in) and it stays this class: `compute_dtype` then says what the layers compute in
    (the embedding's output is cast to it), and a head module with a `logits(x)` method computes the
    logits itself (the tied head hook: QuantEmbedding multiplies by its table in row chunks). The head
    is `lm_head` when the model has one (untied), else the embedding."""

    def __init__(self, cfg: GemmaConfig, untied_head: bool = False, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = compute_dtype  # None: the embedding's weight dtype
        self.model = _Body(cfg)
        if untied_head:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype if self.compute_dtype is not None else self.model.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids)
        if self.compute_dtype is not None:
            h = h.to(self.compute_dtype)
        return h * embed_scale(self.cfg, h.dtype)

    def layer_context(self, seq_len: int, device=None, dtype=None) -> LayerContext:
        cfg = self.cfg
        device = device or self.model.norm.weight.device
        dtype = dtype or self.dtype
        return make_layer_context(cfg, seq_len, device, dtype)

    def prepare(self, ids: torch.Tensor) -> tuple[torch.Tensor, LayerContext]:
        """ids [B, S] → (embedded h, the context every layer of this batch reads)."""
        if self.cfg.media_token_ids and self.cfg.pad_token_id is not None:
            # Gemma4ForConditionalGeneration embeds image/video/audio placeholders as pad, in both
            # tables, even in text-only input (the vision/audio features would replace them)
            media = torch.tensor(self.cfg.media_token_ids, device=ids.device)
            ids = torch.where(torch.isin(ids, media), self.cfg.pad_token_id, ids)
        h = self.embed(ids)
        ctx = self.layer_context(ids.shape[1], h.device, h.dtype)
        if self.cfg.hidden_size_per_layer_input:
            m = self.model
            ctx.per_layer = per_layer_inputs(self.cfg, m.embed_tokens_per_layer, m.per_layer_model_projection,
                                             m.per_layer_projection_norm, ids, h)
        return h, ctx

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head, final soft-cap. Pass only the positions whose logits you need."""
        table = self.lm_head if hasattr(self, "lm_head") else self.model.embed_tokens
        x = self.model.norm(h)
        logits = table.logits(x) if hasattr(table, "logits") else F.linear(x, table.weight)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, ids: torch.Tensor, logits_from: int = 0) -> torch.Tensor:
        """ids [B, S] → logits [B, S - logits_from, vocab]."""
        h, ctx = self.prepare(ids)
        for layer in self.layers:
            h = layer(h, ctx)
        return self.head(h[:, logits_from:])


def make_layer_context(cfg: GemmaConfig, seq_len: int, device, dtype) -> LayerContext:
    pos = torch.arange(seq_len, device=device)
    rope = {
        "full_attention": rope_cos_sin(pos, cfg.head_dim_of_kind("full_attention"), cfg.rope_theta,
                                       cfg.rope_scaling_factor, dtype, cfg.rope_partial_factor),
        "sliding_attention": rope_cos_sin(pos, cfg.head_dim_of_kind("sliding_attention"), cfg.rope_local_theta,
                                          1.0, dtype),
    }
    diff = pos[:, None] - pos[None, :]  # i - j
    causal = diff >= 0
    neg = torch.tensor(float("-inf"), device=device)
    zero = torch.tensor(0.0, device=device)
    mask = {"full_attention": torch.where(causal, zero, neg)}
    window = cfg.sliding_window or seq_len
    mask["sliding_attention"] = torch.where(causal & (diff < window), zero, neg)
    return LayerContext(rope=rope, mask=mask)


def build_model(cfg: GemmaConfig, dtype: torch.dtype = torch.float32, device="cpu",
                untied_head: bool = False) -> Gemma:
    """An uninitialised model (weights are filled by `loading.load_weights`)."""
    with torch.device("meta"):
        m = Gemma(cfg, untied_head)
    m = m.to_empty(device=device).to(dtype)
    return m.eval().requires_grad_(False)
