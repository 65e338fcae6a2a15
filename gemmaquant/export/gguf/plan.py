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

Gemma 4 adds: `rope_freqs` (made by the converter, F32); the router `ffn_gate_inp` (F32) and
`per_layer_model_proj` (BF16) are never quantized; `per_layer_token_embd` is a token embedding in
llama.cpp's categories, so it takes the tied-output rule too; fused experts are quantized row by row
(rows of ne0 = the last HF dim); each role's counter (ffn_down, ffn_down_exps, ...) runs once per layer,
which is the layer llama.cpp reads from the name on a mixture of experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import GemmaQuantError
from ...formats.config import FULL, GemmaConfig
from ...formats.gguf.names import ROPE_FREQS, gguf_name, llama_order_key
from ...numerics.ggml.types import GGMLType
from ...schemes import SCHEMES, Scheme, get_scheme
from .preset_rules import Where, category, fallback, requires_imatrix, rule_type

_FLOAT = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


@dataclass(frozen=True)
class TensorPlan:
    name: str  # GGUF name
    hf_name: str
    shape: tuple[int, ...]  # numpy / HF order: (rows = out_features, n_per_row = in_features)
    type: GGMLType
    reason: str  # for the --dry-run table: "ffn_down 4/18: use_more_bits -> Q6_K"
    fallback: bool = False  # counted by llama-quantize's "N of M tensor(s) required fallback"
    norm: bool = False  # HF stores w, GGUF stores 1 + w (Gemma 1-3)

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
    if has_lm_head and config.generation >= 3:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def check_gemma4(config: GemmaConfig) -> None:
    """Refuse, in one line, a Gemma 4 configuration that llama.cpp's converter rejects or that its
    `gemma4` graph would silently compute differently."""
    def no(what: str) -> None:
        raise GemmaQuantError(f"config.json: {what}; llama.cpp's gemma4 cannot represent it, so no GGUF is written")

    if config.head_dim_of_kind(FULL) == config.head_dim:
        no(f"full layers have head_dim {config.head_dim} like the sliding ones (the converter needs global_head_dim "
           "!= head_dim)")
    if config.rope_scaling_factor != 1.0:
        no(f"the full layers' RoPE 'factor' is {config.rope_scaling_factor:g} (allowed: 1)")
    first = config.first_kv_shared
    if config.num_kv_shared_layers:  # llama.cpp reuses layer first-2 (sliding) / first-1 (full) by position
        pos = {"sliding_attention": first - 2, "full_attention": first - 1}
        for i in range(first, config.num_hidden_layers):
            want = pos[config.layer_types[i]]
            if want < 0 or config.kv_source(i) != want or config.layer_types[want] != config.layer_types[i]:
                no(f"KV-shared layer {i} reuses layer {config.kv_source(i)}, but llama.cpp reuses layer {want} "
                   f"(the last two non-shared layers must be sliding, full)")
    if config.hidden_size_per_layer_input and config.vocab_size_per_layer_input != config.vocab_size:
        no(f"vocab_size_per_layer_input {config.vocab_size_per_layer_input} differs from vocab_size {config.vocab_size}")


def plan_types(config: GemmaConfig, scheme: str | Scheme, has_imatrix: bool, *,
               has_lm_head: bool = False) -> list[TensorPlan]:
    """Per-tensor types for `scheme`, in llama.cpp's tensor order (the order of the output file)."""
    s = preset(scheme)
    default = GGMLType[s.default_type]
    name = s.name
    gen = config.generation
    if gen == 4:
        check_gemma4(config)
    items = []
    for hf, shape in hf_tensors(config, has_lm_head).items():
        g = gguf_name(hf, gen)
        if g is not None:
            items.append((g, hf, shape))
    if gen == 4:
        items.append((ROPE_FREQS, "", (config.head_dim_of_kind(FULL) // 2,)))
    items.sort(key=lambda it: llama_order_key(it[0]))
    names = {g for g, _, _ in items}
    tied = "output.weight" not in names
    n_attn_v = sum(1 for g in names if "attn_v.weight" in g)
    n_layer = config.num_hidden_layers
    # llama.cpp's n_gqa(0): layer 0's query heads per KV head (all Gemma 1-3 layers share it)
    n_gqa = config.num_attention_heads // config.num_key_value_heads if config.num_key_value_heads else 0
    n_expert = (config.num_experts or 1) if config.is_moe else 1
    counters: dict[str, int] = {}
    plans = []
    for g, hf, shape in items:
        is_norm = hf.endswith("norm.weight") and config.norm_unit_offset
        if len(shape) < 2 or g.endswith("_norm.weight"):
            plans.append(TensorPlan(g, hf, shape, GGMLType.F32, "norm / 1-D: always F32", norm=is_norm))
            continue
        if g.endswith("ffn_gate_inp.weight"):
            plans.append(TensorPlan(g, hf, shape, GGMLType.F32, "expert router: never quantized, F32"))
            continue
        if g == "per_layer_model_proj.weight":
            plans.append(TensorPlan(g, hf, shape, GGMLType.BF16, "never quantized: the converter's BF16"))
            continue
        ncols = shape[-1]
        if default not in _FLOAT:
            cat = category(g, tied)
            role = g.split(".", 2)[-1] if g.startswith("blk.") else g  # llama.cpp counts each role apart
            i = counters.get(role, 0)
            counters[role] = i + 1
            n = n_attn_v if cat == "attn_v" else n_layer
            t, why = rule_type(name, cat, default, ncols, Where(i, n, n_gqa, has_imatrix, n_expert))
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
