"""Gemma 4's new blocks: the mixture-of-experts block (router + experts) and per-layer inputs (PLE).

Numerics follow transformers' `modeling_gemma4.py` (eager paths):
  * the scale-free RMSNorm (router input, values) is x·(mean(x²)+eps)^-1/2 with torch.pow, in float32;
  * the router normalizes the post-attention residual, scales it by `scale`·H^-1/2, takes a float32
    softmax over all experts, keeps the top k, renormalizes them to sum 1 and multiplies each by its
    expert's `per_expert_scale`;
  * experts are stored fused as in the checkpoint (`gate_up_proj` [E, 2I, H], gate rows first;
    `down_proj` [E, H, I]) and run in ascending expert order, each adding its weighted output to a
    zero tensor with index_add_ (the order matters at 1e-5: summing by top-k slot differs by ~3e-5);
  * per-layer inputs: the token part is a second embedding table scaled by sqrt(P), the context part
    projects the scaled main embedding (·H^-1/2), RMS-normalizes each layer's P-slice, and the two are
    averaged by 2^-1/2. Layer l reads columns l·P .. l·P+P-1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.config import GemmaConfig


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 4's RMSNorm without a weight (values on every layer, the router input)."""
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)).type_as(x)


class Router(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.eps, self.top_k = cfg.rms_norm_eps, cfg.top_k_experts
        self.root = cfg.hidden_size ** -0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] → (weights [N, k] float32, expert ids [N, k])."""
        z = rms_norm(x, self.eps) * self.scale * self.root
        probs = F.softmax(self.proj(z), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """The experts' GeGLU MLPs, fused per expert as the checkpoint stores them."""

    # observer(e, "gate_up" | "down", x): calibration's view of each expert's inputs (x: the tokens routed
    # to e; the down input before the routing weight), as llama-imatrix's MUL_MAT_ID hook sees them. A
    # class default, so subclasses with their own __init__ (quantized experts) have it too.
    observer = None
    # standin(which, e) -> weight or None: a value standing in for expert e's stored "gate_up" or "down"
    # weight (the sensitivity pass tries a GGML type on a fused tensor expert by expert, with no float
    # copy of the whole tensor); None: the stored one. A class default, like `observer`.
    standin = None

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def gate_up(self, e: int, like: torch.Tensor) -> torch.Tensor:
        """Expert `e`'s fused gate/up weight [2I, H] for a matmul with `like`, in its dtype (quantized
        subclasses dequantize into a shared scratch buffer: use it before asking for the next weight;
        weights kept narrower than the activations, `load_layer(stored=True)`, are cast per expert)."""
        w = self.standin("gate_up", e) if self.standin is not None else None
        return (self.gate_up_proj[e] if w is None else w).to(like.dtype)

    def down(self, e: int, like: torch.Tensor) -> torch.Tensor:
        """Expert `e`'s down weight [H, I], as `gate_up`."""
        w = self.standin("down", e) if self.standin is not None else None
        return (self.down_proj[e] if w is None else w).to(like.dtype)

    def expert(self, e: int, xe: torch.Tensor) -> torch.Tensor:
        """Expert `e`'s GeGLU MLP on its tokens xe [n, H] → [n, H]."""
        if self.observer is not None:
            self.observer(e, "gate_up", xe)
        gate, up = F.linear(xe, self.gate_up(e, xe)).chunk(2, dim=-1)
        h = F.gelu(gate, approximate="tanh") * up
        if self.observer is not None:
            self.observer(e, "down", h)
        return F.linear(h, self.down(e, h))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, H], weights/idx [N, k] → Σ_k weight · expert_idx(x)  [N, H]."""
        out = torch.zeros_like(x)
        by_slot = idx.t()  # [k, N]: tokens in transformers' order (slot-major)
        for e in torch.unique(idx).tolist():  # ascending expert ids
            slot, tok = torch.where(by_slot == e)
            y = self.expert(e, x[tok])
            out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
        return out


def per_layer_inputs(cfg: GemmaConfig, table: nn.Module, projection: nn.Module, norm: nn.Module,
                     ids: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """PLE inputs [B, S, L, P] from token ids and the scaled main embedding `x0` [B, S, H].
    `table` looks up the per-layer embedding rows [V_pl, L·P], `projection` is the model projection."""
    return combine_per_layer(cfg, table(ids), projection(x0), norm)


def combine_per_layer(cfg: GemmaConfig, rows: torch.Tensor, projected: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Per-layer inputs [B, S, n, P] of n consecutive layers from their columns of the per-layer table
    rows [B, S, n·P] and of the model projection of x0 [B, S, n·P] (n = L: `per_layer_inputs`; n = 1:
    one layer's slice, for layer-by-layer calibration)."""
    p = cfg.hidden_size_per_layer_input
    shape = (*rows.shape[:-1], rows.shape[-1] // p, p)
    tok = (rows * torch.tensor(math.sqrt(p), dtype=rows.dtype)).to(projected.dtype).reshape(shape)
    ctx = norm((projected * cfg.hidden_size ** -0.5).reshape(shape))
    return (ctx + tok) * 2.0 ** -0.5
