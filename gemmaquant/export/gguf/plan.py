"""Which GGML type each tensor gets for a GGUF preset: llama-quantize's choice, reproduced.

Source: `src/llama-quant.cpp` (llama_tensor_get_type, tensor_type_fallback, tensor_allows_quantization)
as summarized in docs/gguf-gemma.md §4. The file we write equals `convert_hf_to_gguf.py --outtype bf16`
followed by `llama-quantize <preset>`, so the rules run over tensors in llama.cpp's order (§1.7) with
its per-category counters:

* 1-D tensors and `*_norm.weight` stay F32 (the converter writes them F32; quantize never touches them).
* F16 / BF16 presets: every other tensor gets that type; no rule or fallback applies (not "quantized").
* Quantized presets start from the preset's default type, then
  1. tied `token_embd` (no `output.weight`; every Gemma) or `output`: Q8_0 if its row length is not a
     multiple of the default type's block, else Q6_K unless the default is Q8_0;
  2. `attn_v` (counter over attn_v tensors) and 3. `ffn_down` (counter over n_layer) bump to Q6_K on
     `use_more_bits` layers for *_M, to Q5_K early for Q4_K_S, and Q4_0/Q5_0 with an imatrix use
     Q4_1/Q5_1 on the first n/8 ffn_down;
  4. the fallback: a row length not divisible by the block demotes Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0,
     and to F16 when even 32 does not divide it (counted as llama-quantize's "required fallback").

Gemma 4 adds: `rope_freqs` (made by the converter, F32); the router `ffn_gate_inp` (F32) and
`per_layer_model_proj` (BF16) are never quantized; `per_layer_token_embd` is a token embedding and so
takes the tied-output rule too; fused experts are quantized row by row (rows of ne0 = the last HF
dim); on a mixture of experts the ffn_down rule reads the layer from the name, so `ffn_down` and
`ffn_down_exps` of one layer get the same bump.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...formats.config import FULL, GemmaConfig
from ...errors import GemmaQuantError
from ...numerics.ggml.types import BLOCK, GGMLType
from ...schemes import SCHEMES, Scheme, get_scheme
from ...formats.gguf.names import ROPE_FREQS, gguf_name, llama_order_key

_FLOAT = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}


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


def use_more_bits(i: int, n: int) -> bool:
    """llama-quantize's layer pick for *_M presets (integer division); n=18 -> {0,1,4,7,10,13,15,16,17}."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def hf_tensors(config: GemmaConfig, has_lm_head: bool = False) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor the converter writes (Gemma 1/2 drop lm_head)."""
    shapes = dict(config.expected_shapes())
    if has_lm_head and config.generation >= 3:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def _fallback(t: GGMLType, ncols: int) -> tuple[GGMLType, str | None]:
    block = BLOCK[t][0]
    if ncols % block == 0:
        return t, None
    new = _FALLBACK.get(t, t)  # a 32-block type has no smaller block: straight to F16
    if ncols % BLOCK[new][0] != 0:
        new = GGMLType.F16
    return new, f"fallback: {ncols} % {block} ≠ 0 -> {new.name}"


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
    i_attn_v = i_ffn_down = 0
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
            t, why = default, f"default {default.name}"
            if g == "output.weight" or (tied and g in ("token_embd.weight", "per_layer_token_embd.weight")):
                what = "output" if g == "output.weight" else f"tied {g.split('.')[0]} (= output)"
                if ncols % BLOCK[default][0] != 0:
                    t, why = GGMLType.Q8_0, f"{what}: {ncols} % {BLOCK[default][0]} ≠ 0 -> Q8_0"
                elif default != GGMLType.Q8_0:
                    t, why = GGMLType.Q6_K, f"{what} -> Q6_K"
            elif "attn_v.weight" in g:
                i = i_attn_v
                i_attn_v += 1
                if name in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_attn_v):
                    t, why = GGMLType.Q6_K, f"attn_v {i}/{n_attn_v}: use_more_bits -> Q6_K"
                elif name == "q4_k_s" and i < 4:
                    t, why = GGMLType.Q5_K, f"attn_v {i} < 4 -> Q5_K"
            elif "ffn_down" in g:
                i = int(g.split(".")[1]) if config.is_moe else i_ffn_down
                i_ffn_down += 1
                if name in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_layer):
                    t, why = GGMLType.Q6_K, f"ffn_down {i}/{n_layer}: use_more_bits -> Q6_K"
                elif name == "q4_k_s" and i < n_layer // 8:
                    t, why = GGMLType.Q5_K, f"ffn_down {i} < {n_layer}/8 -> Q5_K"
                elif name == "q4_0" and has_imatrix and i < n_layer // 8:
                    t, why = GGMLType.Q4_1, f"ffn_down {i} < {n_layer}/8 with imatrix -> Q4_1"
            t, fb = _fallback(t, ncols)
            plans.append(TensorPlan(g, hf, shape, t, why + (f"; {fb}" if fb else ""), fallback=fb is not None))
        else:  # F16 / BF16: not a quantized type, so no rule and no fallback
            plans.append(TensorPlan(g, hf, shape, default, f"default {default.name}"))
    return plans


def fallback_count(plans: list[TensorPlan]) -> int:
    return sum(p.fallback for p in plans)
