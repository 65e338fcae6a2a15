"""What every opened artifact is: the built-in `Gemma` with quantized Linears and a QuantEmbedding as its
embedding (and tied LM head, through Gemma's head hook), wrapped in an Artifact that says where it came
from and what its weights cost. The GGUF and compressed-tensors openers (artifact.py, ct_artifact.py)
both build through `assemble`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.config import GemmaConfig
from ..model.gemma import Gemma
from ..model.gemma4_blocks import Experts
from ..model.qlinear import QuantEmbedding, QuantLinear
from .gemma4_gguf import QuantExperts


@dataclass
class Artifact:
    model: Gemma
    tokenizer: object
    kind: str  # "gguf" | "compressed-tensors" | "hf"
    path: Path
    name: str
    files: list[Path]
    formats: dict[str, int] = field(default_factory=dict)  # Linear format -> count
    linear_weights: int = 0  # weights in the decoder Linears
    linear_bytes: int = 0  # their stored bytes, scales and zero points included

    @property
    def config(self) -> GemmaConfig:
        return self.model.cfg

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    @property
    def bpw_linear(self) -> float:
        return 8.0 * self.linear_bytes / self.linear_weights if self.linear_weights else float("nan")

    @property
    def bpw_file(self) -> float:
        return 8.0 * self.size_bytes / self.config.param_count()


class LinearExperts(Experts):
    """Experts stored as one Linear per expert and projection (compressed-tensors / vLLM layout:
    `experts.{e}.gate_proj` …): each runs its own module, so W8A8 experts quantize their activations
    per token as vLLM's fused MoE kernels do (the same scales for gate and up, which share the input)."""

    def __init__(self, cfg: GemmaConfig, gate: list[QuantLinear], up: list[QuantLinear], down: list[QuantLinear]):
        nn.Module.__init__(self)
        self.num_experts = cfg.num_experts
        self.gate_proj, self.up_proj, self.down_proj = nn.ModuleList(gate), nn.ModuleList(up), nn.ModuleList(down)

    def expert(self, e: int, xe: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.gate_proj[e](xe), approximate="tanh") * self.up_proj[e](xe)
        return self.down_proj[e](h)


def assemble(cfg: GemmaConfig, dtype, qlin, norm, per_expert: bool = False) -> Gemma:
    """A Gemma computing in `dtype` whose Linears come from `qlin(hf_name)`, embedding tables from it as
    QuantEmbeddings (the tied LM head among them), and norms from `norm(hf_name)` (HF form).
    per_expert: MoE experts stored as per-expert Linears (`config.expert_linears` names) rather than
    the fused `experts.gate_up_proj` / `experts.down_proj`."""
    with torch.device("meta"):
        model = Gemma(cfg, compute_dtype=dtype)
    model.eval().requires_grad_(False)
    model.model.embed_tokens = QuantEmbedding(qlin("model.embed_tokens.weight"))
    for i, layer in enumerate(model.layers):
        for suffix in cfg.linear_shapes(i):
            *path, attr = suffix.split(".")
            parent = layer
            for part in path:
                parent = getattr(parent, part)
            setattr(parent, attr, qlin(f"model.layers.{i}.{suffix}.weight"))
    if cfg.generation == 4:
        _assemble_gemma4(model, cfg, qlin, norm, per_expert)
    for name, module in model.named_modules():
        if hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):
            module.weight = nn.Parameter(norm(name + ".weight").float(), requires_grad=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"unfilled tensors: {left[:3]}"
    return model


def _assemble_gemma4(model: Gemma, cfg: GemmaConfig, qlin, norm, per_expert: bool) -> None:
    """Gemma 4's extra tensors: the PLE table (looked up like the embedding) and projection, each
    layer's router (F32 Linear; its scales and the layer scalar as float32 vectors) and experts."""
    m = model.model
    if cfg.hidden_size_per_layer_input:
        m.embed_tokens_per_layer = QuantEmbedding(qlin("model.embed_tokens_per_layer.weight"))
        m.per_layer_model_projection = qlin("model.per_layer_model_projection.weight")

    def vector(hf: str) -> nn.Parameter:  # 1-D tensors that are not norms (Gemma 4 norms have no offset)
        return nn.Parameter(norm(hf).float(), requires_grad=False)

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.layer_scalar = vector(p + "layer_scalar")
        if cfg.is_moe:
            layer.router.proj = qlin(p + "router.proj.weight")
            layer.router.scale = vector(p + "router.scale")
            layer.router.per_expert_scale = vector(p + "router.per_expert_scale")
            if per_expert:
                lin = {s: qlin(p + s + ".weight") for s in cfg.expert_linears(i)}
                layer.experts = LinearExperts(cfg, *([lin[f"experts.{e}.{proj}"] for e in range(cfg.num_experts)]
                                                     for proj in ("gate_proj", "up_proj", "down_proj")))
            else:
                layer.experts = QuantExperts(cfg, qlin(p + "experts.gate_up_proj"), qlin(p + "experts.down_proj"))


def linear_stats(model: Gemma) -> tuple[dict[str, int], int, int]:
    formats: dict[str, int] = {}
    n = nbytes = 0
    for layer in model.layers:
        for m in layer.modules():
            if isinstance(m, QuantLinear):
                formats[m.fmt] = formats.get(m.fmt, 0) + 1
                n += m.weight_count
                nbytes += m.nbytes
    return formats, n, nbytes
