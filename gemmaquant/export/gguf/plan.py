"""Which GGML type each tensor gets for a GGUF preset: llama-quantize's choice, reproduced.

Source: `src/llama-quant.cpp` (llama_tensor_get_type, tensor_type_fallback, tensor_allows_quantization)
as summarized in docs/gguf-gemma.md §4. The file we write equals `convert_hf_to_gguf.py --outtype bf16`
followed by `llama-quantize <preset>`, so the rules run over tensors in llama.cpp's order (§1.7) with
its per-category counters:

* 1-D tensors and `*_norm.weight` stay F32 (the converter writes them F32; quantize never touches them).
* F16 / BF16 presets: every other tensor gets that type; no rule or fallback applies (not "quantized").
* Quantized presets start from the preset's default type, then apply the preset's row of llama-quantize's
  rule table (`preset_rules.py`: output / tied token_embd, attn_v and ffn_down bumps by position, the
  _S/_M/_L mixes) and its fallback when the row length is not a multiple of the block (counted as
  llama-quantize's "required fallback"). Presets whose tensors then need an importance matrix are
  refused without one, as llama-quantize refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import GemmaQuantError
from ...formats.config import GemmaConfig
from ...formats.gguf.names import gguf_name, llama_order_key
from ...numerics.ggml.types import GGMLType
from ...schemes import SCHEMES, Scheme, get_scheme
from .preset_rules import Where, category, fallback, requires_imatrix, rule_type
from .preset_rules import use_more_bits  # noqa: F401 - part of plan's API (export/gguf/__init__, tests)

_FLOAT = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


@dataclass(frozen=True)
class TensorPlan:
    name: str  # GGUF name
    hf_name: str
    shape: tuple[int, ...]  # numpy / HF order: (rows = out_features, n_per_row = in_features)
    type: GGMLType
    reason: str  # for the --dry-run table: "ffn_down 4/18: use_more_bits -> Q6_K"
    fallback: bool = False  # counted by llama-quantize's "N of M tensor(s) required fallback"
    norm: bool = False  # HF stores w, GGUF stores 1 + w

    @property
    def n_per_row(self) -> int:
        return self.shape[-1]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def gguf_schemes() -> list[str]:
    return [s.name for s in SCHEMES.values() if s.is_gguf]


def preset(name_or_scheme: str | Scheme) -> Scheme:
    """The GGUF Scheme for a preset name; the error lists the GGUF presets."""
    if isinstance(name_or_scheme, Scheme):
        s = name_or_scheme
    else:  # names normalised as everywhere else (get_scheme)
        try:
            s = get_scheme(str(name_or_scheme))
        except GemmaQuantError:
            s = None
    if s is None or not s.is_gguf:
        raise GemmaQuantError(f"unknown GGUF preset {str(getattr(s, 'name', name_or_scheme))!r} "
                              f"(allowed: {', '.join(gguf_schemes())})")
    return s


def hf_tensors(config: GemmaConfig, has_lm_head: bool = False) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor the converter writes (Gemma 1/2 drop lm_head)."""
    shapes = dict(config.expected_shapes())
    if has_lm_head and config.generation == 3:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def plan_types(config: GemmaConfig, scheme: str | Scheme, has_imatrix: bool, *,
               has_lm_head: bool = False) -> list[TensorPlan]:
    """Per-tensor types for `scheme`, in llama.cpp's tensor order (the order of the output file)."""
    s = preset(scheme)
    default = GGMLType[s.default_type]
    name = s.name
    gen = config.generation
    items = []
    for hf, shape in hf_tensors(config, has_lm_head).items():
        g = gguf_name(hf, gen)
        if g is not None:
            items.append((g, hf, shape))
    items.sort(key=lambda it: llama_order_key(it[0]))
    names = {g for g, _, _ in items}
    tied = "output.weight" not in names
    n_attn_v = sum(1 for g in names if "attn_v.weight" in g)
    n_layer = config.num_hidden_layers
    # llama.cpp's n_gqa(0): layer 0's query heads per KV head (all Gemma 1-3 layers share it)
    n_gqa = config.num_attention_heads // config.num_key_value_heads if config.num_key_value_heads else 0
    counters: dict[str, int] = {}
    plans = []
    for g, hf, shape in items:
        is_norm = hf.endswith("norm.weight")
        if len(shape) < 2 or g.endswith("_norm.weight"):
            plans.append(TensorPlan(g, hf, shape, GGMLType.F32, "norm / 1-D: always F32", norm=is_norm))
            continue
        ncols = shape[-1]
        if default not in _FLOAT:
            cat = category(g, tied)
            role = g.split(".", 2)[-1] if g.startswith("blk.") else g  # llama.cpp counts each role apart
            i = counters.get(role, 0)
            counters[role] = i + 1
            n = n_attn_v if cat == "attn_v" else n_layer
            t, why = rule_type(name, cat, default, ncols, Where(i, n, n_gqa, has_imatrix))
            t, fb = fallback(t, ncols)
            plans.append(TensorPlan(g, hf, shape, t, why + (f"; {fb}" if fb else ""), fallback=fb is not None))
        else:  # F16 / BF16: not a quantized type, so no rule and no fallback
            plans.append(TensorPlan(g, hf, shape, default, f"default {default.name}"))
    if not has_imatrix:
        need = next((p for p in plans if requires_imatrix(name, p.name, p.type)), None)
        if need is not None:  # llama-quantize: "this quantization requires an imatrix!"
            raise GemmaQuantError(f"GGUF preset {name}: this quantization requires an imatrix ('{need.name}' would be "
                                  f"{need.type.name}); give --imatrix (computed here) or --imatrix-file FILE")
    return plans


def fallback_count(plans: list[TensorPlan]) -> int:
    return sum(p.fallback for p in plans)
