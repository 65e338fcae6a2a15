"""What every opened artifact is: the built-in `Gemma` with quantized Linears and a QuantEmbedding as its
embedding (and tied LM head, through Gemma's head hook), wrapped in an Artifact that says where it came
from and what its weights cost. The GGUF and compressed-tensors openers (artifact.py, ct_artifact.py)
both build through `assemble`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..formats.config import GemmaConfig
from ..model.gemma import Gemma
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


def assemble(cfg: GemmaConfig, dtype, qlin, norm) -> Gemma:
    """A Gemma computing in `dtype` whose Linears come from `qlin(hf_name)`, embedding tables from it as
    QuantEmbeddings (the tied LM head among them), and norms from `norm(hf_name)` (HF form)."""
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
        _assemble_gemma4(model, cfg, qlin, norm)
    for name, module in model.named_modules():
        if hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):
            module.weight = nn.Parameter(norm(name + ".weight").float(), requires_grad=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"unfilled tensors: {left[:3]}"
    return model


def _assemble_gemma4(model: Gemma, cfg: GemmaConfig, qlin, norm) -> None:
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
