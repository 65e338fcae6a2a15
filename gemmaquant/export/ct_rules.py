"""What vLLM can load of a compressed-tensors checkpoint, decided before anything is written: the
Linears left unquantized (`ignore`), group sizes that divide a Linear's input, and the MoE kernels'
shape rules (docs/vllm-formats.md §4, §10)."""

from __future__ import annotations

import re

from ..errors import GemmaQuantError
from ..formats.checkpoint import Checkpoint
from ..formats.multimodal import CT_IGNORE, CT_IGNORE_GEMMA4
from ..schemes import Scheme

MARLIN_GROUP_SIZES = (32, 64, 128)


def ignore_list(cfg) -> list[str]:
    """The Linears left unquantized (everything else matches `targets: Linear`): the tied LM head; Gemma
    4's MoE router (vLLM builds it without a quant method: scales would be unknown parameters) and its
    per-layer-input model projection (llama.cpp never quantizes it either); a multimodal model's towers,
    projector / embedders (as llm-compressor's Gemma 3 and Gemma 4 recipes do). Regexes, so they match
    transformers' module names and vLLM's renamed ones alike."""
    ignore = ["lm_head"]
    if cfg.is_moe:
        ignore.append(r"re:.*router\.proj$")
    if cfg.hidden_size_per_layer_input:
        ignore.append("re:.*per_layer_model_projection$")
    if cfg.multimodal:
        ignore += CT_IGNORE_GEMMA4 if cfg.generation == 4 else CT_IGNORE
    return ignore


def recipe_ignores(scheme: Scheme, *modules: str) -> bool:
    """Whether one of a recipe's extra `ignore` entries names any of `modules` (the source's and the
    output's spelling of one Linear), matched as compressed-tensors and vLLM match them."""
    return any(recipe_ignores_one(p, modules) for p in scheme.extra_ignore)


def check_recipe_ignore(ckpt: Checkpoint, scheme: Scheme, modules: list[tuple[str, ...]]) -> None:
    """An extra `ignore` entry that matches none of the model's Linears is a typo (vLLM would quantize
    what the recipe meant to keep): refuse it, naming an example."""
    for p in scheme.extra_ignore:
        if not any(recipe_ignores_one(p, names) for names in modules):
            raise GemmaQuantError(f"{ckpt.path}: ignore entry {p!r} of scheme '{scheme.name}' matches none of this "
                                  f"model's Linears (such as {modules[0][0] if modules else 'none'})")


def recipe_ignores_one(p: str, modules: tuple[str, ...]) -> bool:
    return any((re.match(p[3:], m) is not None) if p.startswith("re:") else p == m for m in modules)


def check_group(ckpt: Checkpoint, scheme: Scheme, name: str, k: int) -> None:
    w = scheme.weights
    if w.strategy == "group" and k % w.group_size:
        ok = [g for g in MARLIN_GROUP_SIZES if k % g == 0]
        raise GemmaQuantError(
            f"{ckpt.path}: tensor '{name}' has input width {k}, not divisible by the group size "
            f"{w.group_size} of scheme '{scheme.name}' (group sizes that divide {k}: "
            f"{', '.join(map(str, ok)) or 'none'}; or per-channel)")


def check_experts(ckpt: Checkpoint, scheme: Scheme) -> None:
    """vLLM runs weight-only (pack-quantized) experts with the Marlin MoE kernel, which needs
    hidden_size % 128 == 0 and moe_intermediate_size % max(64, group) == 0 (vLLM's
    check_moe_marlin_supports_layer); compressed-tensors itself would write the file regardless."""
    cfg, w = ckpt.config, scheme.weights
    if not cfg.is_moe or scheme.ct_format != "pack-quantized":
        return
    g = w.group_size if w.strategy == "group" else -1
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    if h % 128 or i % max(64, g):
        raise GemmaQuantError(
            f"{ckpt.path}: scheme '{scheme.name}': vLLM's Marlin MoE kernel for weight-only experts needs "
            f"hidden_size % 128 == 0 and moe_intermediate_size % {max(64, g)} == 0; this model has hidden_size "
            f"{h}, moe_intermediate_size {i} (fp8 and int8 --algorithm rtn experts have no such limit)")
