"""Open a compressed-tensors directory (ours, or llm-compressor's) as a QuantGemma.

What each Linear `P` holds decides its module (docs/vllm-formats.md §1-4):
    P.weight_packed (+ weight_scale, weight_shape, [weight_zero_point])   → PackedLinear
    P.weight float8_e4m3fn + weight_scale [+ input_scale]                 → FP8Linear
    P.weight int8 + weight_scale [+ input_scale, input_zero_point]        → Int8Linear
    P.weight bf16/f16/f32 (an ignored layer)                              → DenseLinear
The config group that targets P supplies num_bits and how activations are quantized (none,
dynamic per token, or static). Embedding and norms are unquantized and copied.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..formats.checkpoint import read_shard_index, text_name
from ..formats.config import config_from_dict
from ..errors import GemmaQuantError
from ..formats.inputs import read_json
from ..formats.safetensors import SafetensorsFile
from .quantized import Artifact, assemble, linear_stats


class _Tensors:
    """name → tensor over all shards (multimodal prefixes stripped, as formats/checkpoint.py does)."""

    def __init__(self, root: Path):
        index = read_shard_index(root)
        paths = index.shards if index is not None else sorted(root.glob("*.safetensors"))
        if not paths:
            raise GemmaQuantError(f"{root}: no *.safetensors files")
        self.files = [SafetensorsFile(p) for p in paths]  # validates offsets against file sizes
        self.where: dict[str, tuple[SafetensorsFile, str]] = {}
        for f in self.files:
            for stored in f.keys():
                text = text_name(stored)
                if text is not None:
                    self.where[text] = (f, stored)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise GemmaQuantError(f"tensor '{name}' is missing")
        f, s = self.where[name]
        t = f.get(s)
        if t.is_floating_point() and t.dtype != torch.float8_e4m3fn and not torch.isfinite(t).all():
            bad = int(torch.nonzero(~torch.isfinite(t.reshape(-1)))[0, 0])
            raise GemmaQuantError(f"{f.path}: tensor '{s}' holds NaN/Inf at element {bad} "
                                  f"(byte offset {f.data_offset(s) + bad * t.element_size()}; corrupt)")
        if t.dtype == torch.float8_e4m3fn and (t.view(torch.uint8) & 0x7F == 0x7F).any():
            bad = int(torch.nonzero((t.view(torch.uint8) & 0x7F == 0x7F).reshape(-1))[0, 0])
            raise GemmaQuantError(f"{f.path}: tensor '{s}' holds an FP8 NaN at byte offset "
                                  f"{f.data_offset(s) + bad} (corrupt)")
        return t


def _matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == module or module.endswith("." + pattern) or pattern == "Linear"


def _group_for(qc: dict, module: str) -> dict | None:
    if any(_matches(p, module) and p != "Linear" for p in qc.get("ignore") or []):
        return None
    for g in (qc.get("config_groups") or {}).values():
        if any(_matches(t, module) for t in g.get("targets", [])):
            return g
    return None


def _act_mode(group: dict | None) -> str | None:
    ia = (group or {}).get("input_activations")
    if not ia:
        return None
    return "dynamic" if ia.get("dynamic") else "static"


def open_ct(root: Path, dtype: torch.dtype, device: str):
    from ..model.qlinear import DenseLinear, FP8Linear, Int8Linear, PackedLinear
    from ..formats.tokenizer import load_tokenizer

    raw = read_json(root / "config.json", "config.json")
    cfg = config_from_dict(raw, where=str(root / "config.json"))
    qc = raw["quantization_config"]
    fmt = qc.get("format")
    ts = _Tensors(root)
    expected = cfg.expected_shapes()
    expected.update({f"model.layers.{i}.{s}.weight": nk for i in range(cfg.num_hidden_layers)  # MoE: per-expert Linears
                     for s, (_, _, nk) in cfg.expert_linears(i).items()})

    def shape_check(name: str, t: torch.Tensor, want) -> torch.Tensor:
        if tuple(t.shape) != tuple(want):
            raise GemmaQuantError(f"{root}: tensor '{name}' has shape {list(t.shape)}, config.json implies "
                                  f"{list(want)}")
        return t

    def qlin(hf: str):
        module = hf[: -len(".weight")]
        n, k = expected[hf]
        if module == "model.embed_tokens":
            return DenseLinear(shape_check(hf, ts.get(hf), (n, k)))
        group = _group_for(qc, module)
        wargs = (group or {}).get("weights") or {}
        act = _act_mode(group)
        opt = (lambda s: ts.get(f"{module}.{s}") if f"{module}.{s}" in ts else None)
        if f"{module}.weight_packed" in ts:
            bits = int(wargs.get("num_bits", 4))
            if bits not in (4, 8):
                raise GemmaQuantError(f"{root}: {module}: pack-quantized num_bits {bits} (allowed: 4, 8)")
            shape = tuple(int(v) for v in ts.get(f"{module}.weight_shape").tolist())
            shape_check(f"{module}.weight_shape", torch.empty(shape, device="meta"), (n, k))
            packed = shape_check(f"{module}.weight_packed", ts.get(f"{module}.weight_packed"), (n, -(-k * bits // 32)))
            scale = ts.get(f"{module}.weight_scale")
            if scale.ndim != 2 or scale.shape[0] != n or k % scale.shape[1]:
                raise GemmaQuantError(f"{root}: tensor '{module}.weight_scale' has shape {list(scale.shape)}; "
                                      f"expected [{n}, G] with G dividing {k}")
            zp = opt("weight_zero_point")
            if zp is not None:
                shape_check(f"{module}.weight_zero_point", zp, (-(-n * bits // 32), scale.shape[1]))
            return PackedLinear(packed, scale, bits, n, k, zp)
        if f"{module}.weight" not in ts:
            raise GemmaQuantError(f"{root}: no tensor '{module}.weight' or '{module}.weight_packed'")
        w = shape_check(f"{module}.weight", ts.get(f"{module}.weight"), (n, k))
        if w.dtype == torch.float8_e4m3fn:
            return FP8Linear(w, ts.get(f"{module}.weight_scale"), act, opt("input_scale"))
        if w.dtype == torch.int8:
            if f"{module}.weight_zero_point" in ts:
                raise GemmaQuantError(f"{root}: {module}: asymmetric int-quantized weights are not supported")
            return Int8Linear(w, ts.get(f"{module}.weight_scale"), act, opt("input_scale"),
                              opt("input_zero_point"))
        if w.is_floating_point():
            return DenseLinear(w)
        raise GemmaQuantError(f"{root}: tensor '{module}.weight' has dtype {w.dtype} (format {fmt!r})")

    def norm(hf: str) -> torch.Tensor:
        return shape_check(hf, ts.get(hf), expected[hf]).float()

    for m in [k[: -len(".weight")] for k in expected if k.endswith("_proj.weight")]:
        if _act_mode(_group_for(qc, m)) == "static" and f"{m}.input_scale" not in ts:
            raise GemmaQuantError(f"{root}: {m}: static input activations but no '{m}.input_scale'")
    model = assemble(cfg, dtype, qlin, norm, per_expert=cfg.is_moe)
    if "lm_head.weight" in ts:
        raise GemmaQuantError(f"{root}: an untied 'lm_head.weight' is not supported (Gemma ties it)")
    formats, n, nbytes = linear_stats(model)
    files = sorted(p for p in root.iterdir() if p.is_file())
    return Artifact(model.to(device), load_tokenizer(root), "compressed-tensors", root, root.name, files,
                    formats, n, nbytes)
