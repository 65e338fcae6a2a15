"""Fill the built-in model from a checkpoint, one tensor at a time (whole model or one layer)."""

from __future__ import annotations

import torch
from torch import nn

from ..formats.checkpoint import Checkpoint
from ..formats.safetensors import release_pages
from ..errors import GemmaQuantError
from ..limits import check_dtype
from .gemma import DecoderLayer, Gemma, build_model
from .qlinear import DenseLinear


def _copy_params(module: nn.Module, ckpt: Checkpoint, prefix: str) -> None:
    for name, param in module.named_parameters():
        _copy_tensor(param, ckpt, prefix + name)


COPY_VALUES = 1 << 24  # values checked and copied at a time (16 MB of isfinite flags, 32 MB of bf16)


def _copy_tensor(dst: torch.Tensor, ckpt: Checkpoint, key: str) -> None:
    """dst ← the stored tensor, a slice at a time: each slice checked, copied and its mapped pages
    dropped, so that neither the mapped source (it would count in the process's memory beside the copy
    until the reader's resident window pushed it out) nor a whole tensor of isfinite flags ever adds
    up (26B-A4B's fused gate/up experts: 1 GB mapped and 0.5 GB of flags)."""
    src = ckpt.tensor(key).reshape(-1)
    with torch.no_grad():
        flat = dst.view(-1)
        for a in range(0, src.numel(), COPY_VALUES):
            part = src[a:a + COPY_VALUES]
            if not torch.isfinite(part).all():
                raise GemmaQuantError(f"{ckpt.file_of(key)}: tensor '{key}' contains NaN or Inf")
            flat[a:a + COPY_VALUES].copy_(part)
            release_pages(part)


def load_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device="cpu") -> Gemma:
    """The whole model in `dtype` on `device`, with the checkpoint's own LM head if it stores one."""
    model = build_model(ckpt.config, dtype, device, untied_head="lm_head.weight" in ckpt.names())
    _copy_params(model, ckpt, "")
    return model


def load_layer(ckpt: Checkpoint, index: int, dtype: torch.dtype = torch.float32, device="cpu",
               stored: bool = False) -> DecoderLayer:
    """Decoder layer `index` alone: calibrating big models layer by layer keeps one resident.

    `stored`: the weights that make a layer big (its Linears, Gemma 4's fused experts) stay in the
    checkpoint's dtype and are cast to the activations' dtype where used, one Linear or one expert at
    a time (`DenseLinear`, `Experts.gate_up`/`down`): the same values as a `dtype` copy, at the stored
    size (a 26B-A4B MoE layer: 1.5 GB in bf16 against 3 GB in float32), and no `dtype` tensor of
    their size is ever allocated. Norms and scales take `dtype`."""
    prefix = f"model.layers.{index}."
    with torch.device("meta"):
        layer = DecoderLayer(ckpt.config, index).to(dtype)
        if stored:
            _keep_stored(layer, ckpt, prefix)
    layer = layer.to_empty(device=device).eval().requires_grad_(False)
    _copy_params(layer, ckpt, prefix)
    if stored:
        for name, mod in layer.named_modules():
            if isinstance(mod, DenseLinear):
                _copy_tensor(mod.weight, ckpt, f"{prefix}{name}.weight")
    return layer


def _keep_stored(layer: nn.Module, ckpt: Checkpoint, prefix: str) -> None:
    """On the meta layer: its Linears become `DenseLinear`s and its fused experts' parameters take the
    stored dtype, so that `to_empty` allocates them at their stored size."""
    for name, mod in list(layer.named_modules()):
        if isinstance(mod, nn.Linear):
            key = f"{prefix}{name}.weight"
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child,
                    DenseLinear(torch.empty(mod.weight.shape, dtype=ckpt.dtype(key))))
        elif hasattr(mod, "gate_up_proj"):  # Gemma 4's fused experts
            for p in ("gate_up_proj", "down_proj"):
                dt = ckpt.dtype(f"{prefix}{name}.{p}")
                setattr(mod, p, nn.Parameter(torch.empty(getattr(mod, p).shape, dtype=dt), requires_grad=False))


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        # CPUs without bf16 units run float32 matmuls faster (and more accurately) than bf16.
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    check_dtype(name)  # the one list of names, with the error naming them
    return choices[name]
