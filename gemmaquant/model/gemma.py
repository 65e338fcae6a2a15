"""The built-in Gemma 1/2/3 text model: one skeleton, config flags for the generations.

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
  * GeGLU MLP with tanh-approximated GELU; the LM head is the (tied) embedding.
Every projection is an `nn.Linear` (or a drop-in quantized module) so calibration can hook its input,
and decoder layers can run one at a time (`embed` → `layer_context` → `layers[i]` → `head`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.config import GemmaConfig


def embed_scale(cfg: GemmaConfig, dtype: torch.dtype) -> torch.Tensor:
    """Gemma multiplies embeddings by sqrt(hidden_size), rounded to the compute dtype first, as
    transformers and vLLM do (in bf16, 640**0.5 becomes 25.25, not 25.298...)."""
    return torch.tensor(math.sqrt(cfg.hidden_size), dtype=dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # Gemma stores w; the scale is (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, factor: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, head_dim] computed in float32 (as transformers does), then cast to `dtype`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))
    inv_freq = inv_freq / factor
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class LayerContext:
    """Per-sequence tensors shared by all layers: RoPE tables and masks for both layer kinds."""

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer kind -> (cos, sin) [S, D]
    mask: dict[str, torch.Tensor]  # layer kind -> additive float mask [S, S] (0 / -inf)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.layer_types[layer_idx]
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scaling = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.q_dim, bias=False)
        self.k_proj = nn.Linear(h, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(h, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.q_dim, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KV, S, D]
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = ctx.rope[self.kind]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        mask = ctx.mask[self.kind].to(q.dtype)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        else:  # Gemma 2: cap the raw scores before masking, softmax in float32
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
            scores = torch.tanh(scores / self.softcap) * self.softcap
            probs = torch.softmax((scores + mask).float(), dim=-1).to(q.dtype)
            out = torch.matmul(probs, v)
        out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.sandwich = cfg.sandwich_norms
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
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
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Body(cfg)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids)
        return h * embed_scale(self.cfg, h.dtype)

    def layer_context(self, seq_len: int, device=None, dtype=None) -> LayerContext:
        cfg = self.cfg
        device = device or self.model.embed_tokens.weight.device
        dtype = dtype or self.dtype
        return make_layer_context(cfg, seq_len, device, dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, tied LM head, final soft-cap. Pass only the positions whose logits you need."""
        logits = F.linear(self.model.norm(h), self.model.embed_tokens.weight)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, ids: torch.Tensor, logits_from: int = 0) -> torch.Tensor:
        """ids [B, S] → logits [B, S - logits_from, vocab]."""
        h = self.embed(ids)
        ctx = self.layer_context(ids.shape[1], h.device, h.dtype)
        for layer in self.layers:
            h = layer(h, ctx)
        return self.head(h[:, logits_from:])


def make_layer_context(cfg: GemmaConfig, seq_len: int, device, dtype) -> LayerContext:
    pos = torch.arange(seq_len, device=device)
    rope = {
        "full_attention": rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, dtype),
        "sliding_attention": rope_cos_sin(pos, cfg.head_dim, cfg.rope_local_theta, 1.0, dtype),
    }
    diff = pos[:, None] - pos[None, :]  # i - j
    causal = diff >= 0
    neg = torch.tensor(float("-inf"), device=device)
    zero = torch.tensor(0.0, device=device)
    mask = {"full_attention": torch.where(causal, zero, neg)}
    window = cfg.sliding_window or seq_len
    mask["sliding_attention"] = torch.where(causal & (diff < window), zero, neg)
    return LayerContext(rope=rope, mask=mask)


def build_model(cfg: GemmaConfig, dtype: torch.dtype = torch.float32, device="cpu") -> Gemma:
    """An uninitialised model (weights are filled by `loading.load_weights`)."""
    with torch.device("meta"):
        m = Gemma(cfg)
    m = m.to_empty(device=device).to(dtype)
    return m.eval().requires_grad_(False)
