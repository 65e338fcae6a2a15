"""Open a compressed-tensors directory (ours, or llm-compressor's) as a Gemma with quantized Linears.

Each Linear `P` is loaded by its format object (numerics/ct/formats.py, docs/vllm-formats.md §1-4):
the one its config group (or quantization_config) declares, or, for llm-compressor's mixed-precision
files and Linears no group targets, the one its tensors are. The format reads and checks `P.weight*`
and returns a `Loaded`; MODULES turns that into the QuantLinear it runs as:
    pack-quantized  P.weight_packed + weight_scale, weight_shape [, weight_zero_point]  → PackedLinear
    float-quantized P.weight float8_e4m3fn + weight_scale [+ input_scale]              → FP8Linear
    int-quantized   P.weight int8 + weight_scale [+ input_scale, input_zero_point]     → Int8Linear
    dense           P.weight bf16/f16/f32 (an ignored layer, the embedding)            → DenseLinear
The config group that targets P supplies num_bits and how activations are quantized (none,
dynamic per token, or static). Norms are unquantized and copied. Tensor names are built in one place
(`_Linear.name`).
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
from ..model.qlinear import DenseLinear, FP8Linear, Int8Linear, PackedLinear, QuantLinear
from ..numerics.ct.formats import DENSE, Loaded, stored_format
from .quantized import Artifact, assemble, linear_stats


class _Tensors:
    """name → tensor over all shards (multimodal prefixes stripped, as formats/checkpoint.py does)."""

    def __init__(self, root: Path):
        self.root = root
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

    def dtype(self, name: str) -> torch.dtype:
        f, s = self.where[name]
        return f.dtype(s)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise GemmaQuantError(f"{self.root}: tensor '{name}' is missing")
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


class _Linear:
    """One Linear's tensors, by suffix (the `formats.Stored` a format loads from): `model.layers.0.mlp.up_proj`
    + `.weight_packed`, ... (the one place this loader names a Linear's tensors)."""

    def __init__(self, ts: _Tensors, module: str):
        self.ts, self.module, self.where = ts, module, str(ts.root)

    def name(self, suffix: str) -> str:
        return f"{self.module}.{suffix}"

    def has(self, suffix: str) -> bool:
        return self.name(suffix) in self.ts

    def dtype(self, suffix: str) -> torch.dtype:
        return self.ts.dtype(self.name(suffix))

    def get(self, suffix: str) -> torch.Tensor:
        return self.ts.get(self.name(suffix))


def module_of(hf: str) -> str:
    """The module an HF weight name belongs to (`...q_proj.weight` → `...q_proj`)."""
    return hf.removesuffix(".weight")


# The module each format's Loaded runs as (model/qlinear.py).
MODULES = {
    "dense": lambda d, n, k: DenseLinear(d.tensors["weight"]),
    "float-quantized": lambda d, n, k: FP8Linear(d.tensors["weight"], d.tensors["weight_scale"], d.act,
                                                 d.tensors.get("input_scale")),
    "int-quantized": lambda d, n, k: Int8Linear(d.tensors["weight"], d.tensors["weight_scale"], d.act,
                                                d.tensors.get("input_scale"), d.tensors.get("input_zero_point")),
    "pack-quantized": lambda d, n, k: PackedLinear(d.tensors["weight_packed"], d.tensors["weight_scale"],
                                                   d.num_bits, n, k, d.tensors.get("weight_zero_point")),
}


# Embedding tables (the token embedding, Gemma 4's per-layer one): no config group targets them
# (`targets: Linear` means nn.Linear modules), they are stored as they were.
EMBEDDINGS = ("model.embed_tokens", "model.embed_tokens_per_layer")


def to_module(d: Loaded, n: int, k: int) -> QuantLinear:
    return MODULES[d.format](d, n, k)


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
    from ..formats.tokenizer import load_tokenizer

    raw = read_json(root / "config.json", "config.json")
    cfg = config_from_dict(raw, where=str(root / "config.json"))
    qc = raw["quantization_config"]
    ts = _Tensors(root)
    expected = cfg.expected_shapes()
    expected.update({f"model.layers.{i}.{s}.weight": nk for i in range(cfg.num_hidden_layers)  # MoE: per-expert Linears
                     for s, (_, _, nk) in cfg.expert_linears(i).items()})

    def load(hf: str) -> Loaded:
        module = module_of(hf)
        st, (n, k) = _Linear(ts, module), expected[hf]
        if module in EMBEDDINGS:
            return DENSE.load(st, n, k)
        group = _group_for(qc, module)
        declared = None if group is None else group.get("format", qc.get("format"))
        return stored_format(declared, st).load(st, n, k, (group or {}).get("weights") or {}, _act_mode(group))

    def qlin(hf: str) -> QuantLinear:
        return to_module(load(hf), *expected[hf])

    def norm(hf: str) -> torch.Tensor:
        t = ts.get(hf)
        if tuple(t.shape) != tuple(expected[hf]):
            raise GemmaQuantError(f"{root}: tensor '{hf}' has shape {list(t.shape)}, config.json implies "
                                  f"{list(expected[hf])}")
        return t.float()

    model = assemble(cfg, dtype, qlin, norm, per_expert=cfg.is_moe)
    if "lm_head.weight" in ts:
        raise GemmaQuantError(f"{root}: an untied 'lm_head.weight' is not supported (Gemma ties it)")
    formats, n, nbytes = linear_stats(model)
    files = sorted(p for p in root.iterdir() if p.is_file())
    return Artifact(model.to(device), load_tokenizer(root), "compressed-tensors", root, root.name, files,
                    formats, n, nbytes)
