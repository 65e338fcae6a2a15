"""Fill the built-in model from a checkpoint, one tensor at a time (whole model or one layer)."""

from __future__ import annotations

import torch
from torch import nn

from ..formats.checkpoint import Checkpoint
from ..errors import GemmaQuantError
from ..limits import check_dtype
from .gemma import DecoderLayer, Gemma, build_model


def _copy_params(module: nn.Module, ckpt: Checkpoint, prefix: str) -> None:
    for name, param in module.named_parameters():
        src = ckpt.tensor(prefix + name)
        if not torch.isfinite(src).all():
            raise GemmaQuantError(f"{ckpt.file_of(prefix + name)}: tensor '{prefix + name}' contains NaN or Inf")
        with torch.no_grad():
            param.copy_(src)


def load_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device="cpu") -> Gemma:
    """The whole model in `dtype` on `device`, with the checkpoint's own LM head if it stores one."""
    model = build_model(ckpt.config, dtype, device, untied_head="lm_head.weight" in ckpt.names())
    _copy_params(model, ckpt, "")
    return model


def load_layer(ckpt: Checkpoint, index: int, dtype: torch.dtype = torch.float32, device="cpu") -> DecoderLayer:
    """Decoder layer `index` alone: calibrating big models layer by layer keeps one resident."""
    with torch.device("meta"):
        layer = DecoderLayer(ckpt.config, index)
    layer = layer.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    _copy_params(layer, ckpt, f"model.layers.{index}.")
    return layer


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        # CPUs without bf16 units run float32 matmuls faster (and more accurately) than bf16.
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    check_dtype(name)  # the one list of names, with the error naming them
    return choices[name]
