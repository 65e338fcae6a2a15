"""Gemma 1/2/3/4 text-model configuration: one frozen dataclass of flags for the generations.

Reads a Hugging Face config.json written by transformers 4.x (rope_theta, rope_local_base_freq,
sliding_window_pattern, query_pre_attn_scalar) or 5.x (rope_parameters, layer_types). A multimodal
Gemma 3 checkpoint (model_type "gemma3" with a `text_config`) is read as its text model; its tensors
carry a `language_model.` prefix that the checkpoint reader strips. Gemma 4 ("gemma4_text", or
"gemma4" with a `text_config`) adds per-layer geometry and blocks, read by gemma4_config.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GemmaQuantError
from .config_values import FULL, SLIDING, int_in_range, positive_number, required_int
from .gemma4_config import GEMMA4_DEFAULTS, gemma4_fields

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4")
SUPPORTED_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                           "Gemma3ForConditionalGeneration", "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
# Gemma-family checkpoints that are not one of the above, by model_type: refused by name, so that a
# user learns which model they brought rather than reading about a missing tensor.
OTHER_GEMMA_FAMILIES = {
    "gemma3n": "Gemma 3n", "gemma4_unified": "Gemma 4 (unified)",
    "gemma4_assistant": "Gemma 4 assistant", "gemma4_unified_assistant": "Gemma 4 assistant", "paligemma": "PaliGemma",
    "colpali": "ColPali", "recurrent_gemma": "RecurrentGemma", "t5gemma": "T5Gemma", "t5gemma2": "T5Gemma 2",
    "shieldgemma2": "ShieldGemma 2", "vaultgemma": "VaultGemma", "embedding_gemma2": "EmbeddingGemma 2",
    "diffusion_gemma": "DiffusionGemma",
}
# Gemma 1/2/3 model types whose heads are not a causal LM (EmbeddingGemma is Gemma3TextModel).
OTHER_GEMMA_HEADS = {"Gemma3TextModel": "EmbeddingGemma (a bidirectional embedding model)"}
# The one generation table: generation -> (HF model_type of the text model, GGUF general.architecture).
GENERATIONS = {1: ("gemma", "gemma"), 2: ("gemma2", "gemma2"), 3: ("gemma3_text", "gemma3"),
               4: ("gemma4_text", "gemma4")}

# Defaults of the transformers config classes, used when a key is absent.
_DEFAULTS = {
    "gemma": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=8192),
    "gemma2": dict(
        rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=8192, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
    ),
    "gemma3_text": dict(
        rope_theta=1_000_000.0, rope_local_base_freq=10000.0, rms_norm_eps=1e-6,
        max_position_embeddings=131072, sliding_window=4096, sliding_window_pattern=6,
        query_pre_attn_scalar=256, head_dim=256, num_attention_heads=8, num_key_value_heads=4,
    ),
    "gemma4_text": dict(
        rope_theta=1_000_000.0, rope_local_base_freq=10000.0, rms_norm_eps=1e-6,
        max_position_embeddings=131072, sliding_window=512, head_dim=256, num_attention_heads=8,
        num_key_value_heads=4, final_logit_softcapping=None, attn_logit_softcapping=None,
    ),
}


@dataclass(frozen=True)
class GemmaConfig:
    model_type: str  # "gemma" | "gemma2" | "gemma3_text" | "gemma4_text" (multimodal wrappers map here)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float  # global (full-attention) layers
    rope_local_theta: float  # sliding layers (Gemma 3: 10k; Gemma 1/2: same as global)
    rope_scaling_factor: float  # linear position scaling, global layers only (Gemma 3 4B+: 8)
    query_pre_attn_scalar: float  # queries are scaled by its -1/2 power (27B: 144, not head_dim)
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    sliding_window: int | None
    layer_types: tuple[str, ...]
    qk_norm: bool  # Gemma 3
    sandwich_norms: bool  # Gemma 2/3: post-attention and pre/post feed-forward norms
    multimodal: bool = False  # came from a Gemma3ForConditionalGeneration checkpoint
    bos_token_id: int | None = 2
    eos_token_id: Any = 1
    pad_token_id: int | None = 0
    # Gemma 4 (the defaults leave Gemma 1-3 as they were)
    norm_unit_offset: bool = True  # Gemma 1-3 norms scale by (1 + w); Gemma 4 by w
    layer_head_dims: tuple[int, ...] = ()  # per layer; full layers use global_head_dim (empty: head_dim)
    layer_kv_heads: tuple[int, ...] = ()  # per layer (empty: num_key_value_heads)
    attention_k_eq_v: bool = False  # full layers take V from the raw k_proj output (no v_proj)
    num_kv_shared_layers: int = 0  # the last N layers reuse an earlier layer's keys and values
    hidden_size_per_layer_input: int = 0  # per-layer embeddings (PLE) width; 0: none
    vocab_size_per_layer_input: int = 0
    use_double_wide_mlp: bool = False  # 2x intermediate on KV-shared layers
    num_experts: int = 0  # MoE block beside the dense MLP; 0: none
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    rope_partial_factor: float = 1.0  # full layers rotate this share of the head dim (proportional RoPE)
    media_token_ids: tuple[int, ...] = ()  # Gemma4ForConditionalGeneration embeds these ids as pad
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def generation(self) -> int:
        return next(g for g, (mt, _) in GENERATIONS.items() if mt == self.model_type)

    @property
    def gguf_arch(self) -> str:
        return GENERATIONS[self.generation][1]

    # -- per-layer geometry (constant for Gemma 1-3) ------------------------------------------------
    def head_dim_of(self, layer: int) -> int:
        return self.layer_head_dims[layer] if self.layer_head_dims else self.head_dim

    def kv_heads_of(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_key_value_heads

    def head_dim_of_kind(self, kind: str) -> int:
        """Head dim of a layer kind (validated equal on every layer of that kind)."""
        return next((self.head_dim_of(i) for i, t in enumerate(self.layer_types) if t == kind), self.head_dim)

    @property
    def first_kv_shared(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_shared(self, layer: int) -> bool:
        return layer >= self.first_kv_shared

    def kv_source(self, layer: int) -> int:
        """The layer whose keys/values `layer` attends with: itself, or for a KV-shared layer the last
        non-shared layer of the same kind (transformers' "store" layer)."""
        if not self.kv_shared(layer):
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(self.first_kv_shared) if self.layer_types[i] == kind)

    def has_v_proj(self, layer: int) -> bool:
        return not self.kv_shared(layer) and not (self.attention_k_eq_v and not self.is_sliding(layer))

    def intermediate_of(self, layer: int) -> int:
        wide = self.use_double_wide_mlp and self.kv_shared(layer)
        return self.intermediate_size * (2 if wide else 1)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def linear_shapes(self, layer: int = 0) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each Linear in decoder layer `layer`, by HF suffix (the same
        on every layer before Gemma 4). The MoE router stays out: it is never quantized."""
        if self.generation == 4:
            return self._gemma4_linear_shapes(layer)
        h, i = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (self.q_dim, h),
            "self_attn.k_proj": (self.kv_dim, h),
            "self_attn.v_proj": (self.kv_dim, h),
            "self_attn.o_proj": (h, self.q_dim),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }

    def _gemma4_linear_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        h, i, q = self.hidden_size, self.intermediate_of(layer), self.num_attention_heads * self.head_dim_of(layer)
        kv = self.kv_heads_of(layer) * self.head_dim_of(layer)
        shapes = {"self_attn.q_proj": (q, h)}
        if not self.kv_shared(layer):
            shapes["self_attn.k_proj"] = (kv, h)
        if self.has_v_proj(layer):
            shapes["self_attn.v_proj"] = (kv, h)
        shapes.update({"self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
                       "mlp.down_proj": (h, i)})
        if self.hidden_size_per_layer_input:
            p = self.hidden_size_per_layer_input
            shapes.update({"per_layer_input_gate": (p, h), "per_layer_projection": (h, p)})
        return shapes

    def expert_linears(self, layer: int) -> dict[str, tuple[str, slice, tuple[int, int]]]:
        """The MoE experts as the 2-D Linears vLLM and compressed-tensors store (`experts.{e}.gate_proj`
        …): suffix -> (fused source suffix, its rows in the source's expert slice, (out, in)). Gate is
        rows [0, I) of `gate_up_proj[e]`, up rows [I, 2I), down all of `down_proj[e]`."""
        if not self.is_moe:
            return {}
        h, i = self.hidden_size, self.moe_intermediate_size
        out = {}
        for e in range(self.num_experts):
            out[f"experts.{e}.gate_proj"] = ("experts.gate_up_proj", slice(0, i), (i, h))
            out[f"experts.{e}.up_proj"] = ("experts.gate_up_proj", slice(i, 2 * i), (i, h))
            out[f"experts.{e}.down_proj"] = ("experts.down_proj", slice(0, h), (h, i))
        return out

    def norm_names(self, layer: int = 0) -> tuple[str, ...]:
        names = ["input_layernorm", "post_attention_layernorm"]
        if self.sandwich_norms:
            names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        if self.qk_norm:
            names += ["self_attn.q_norm"] + ([] if self.kv_shared(layer) else ["self_attn.k_norm"])
        if self.is_moe:
            names += ["pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"]
        if self.hidden_size_per_layer_input:
            names += ["post_per_layer_input_norm"]
        return tuple(names)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the HF text checkpoint (names without any multimodal prefix)."""
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
            "model.norm.weight": (self.hidden_size,),
        }
        if self.hidden_size_per_layer_input:
            lp = self.num_hidden_layers * self.hidden_size_per_layer_input
            shapes.update({"model.embed_tokens_per_layer.weight": (self.vocab_size_per_layer_input, lp),
                           "model.per_layer_model_projection.weight": (lp, self.hidden_size),
                           "model.per_layer_projection_norm.weight": (self.hidden_size_per_layer_input,)})
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            for suffix, shape in self.linear_shapes(n).items():
                shapes[p + suffix + ".weight"] = shape
            for norm in self.norm_names(n):
                dim = self.head_dim_of(n) if norm.startswith("self_attn.") else self.hidden_size
                shapes[p + norm + ".weight"] = (dim,)
            if self.generation == 4:
                shapes[p + "layer_scalar"] = (1,)
            if self.is_moe:
                h, e, ie = self.hidden_size, self.num_experts, self.moe_intermediate_size
                shapes.update({p + "router.proj.weight": (e, h), p + "router.scale": (h,),
                               p + "router.per_expert_scale": (e,), p + "experts.gate_up_proj": (e, 2 * ie, h),
                               p + "experts.down_proj": (e, h, ie)})
        return shapes

    def optional_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensors a checkpoint may carry that the forward pass never reads: Google's original Gemma 4
        E2B/E4B files keep k_proj/v_proj/k_norm on KV-shared layers (transformers drops them on load)."""
        shapes = {}
        for n in range(self.first_kv_shared, self.num_hidden_layers):
            p, kv = f"model.layers.{n}.self_attn.", self.kv_heads_of(n) * self.head_dim_of(n)
            shapes.update({p + "k_proj.weight": (kv, self.hidden_size), p + "v_proj.weight": (kv, self.hidden_size),
                           p + "k_norm.weight": (self.head_dim_of(n),)})
        return shapes

    def param_count(self) -> int:
        return sum(math.prod(s) for s in self.expected_shapes().values())


def _rope(d: dict, model_type: str, where: str) -> tuple[float, float, float]:
    """(global theta, local theta, global linear factor) from 4.x keys or 5.x rope_parameters."""
    defaults = _DEFAULTS[model_type]
    rp = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if isinstance(rp, dict) and (FULL in rp or SLIDING in rp):  # 5.x, per layer type
        full = rp.get(FULL, {}) or {}
        local = rp.get(SLIDING, {}) or {}
        theta = positive_number(full.get("rope_theta", defaults["rope_theta"]), "rope_theta", where)
        local_theta = positive_number(local.get("rope_theta", defaults.get("rope_local_base_freq", theta)),
                              "rope_local_base_freq", where)
        scaling = full
    else:
        if isinstance(rp, dict):  # 5.x, one set for all layers
            theta = positive_number(rp.get("rope_theta", d.get("rope_theta", defaults["rope_theta"])), "rope_theta",
                                    where)
            scaling = rp
        else:
            theta = positive_number(d.get("rope_theta", defaults["rope_theta"]), "rope_theta", where)
        local_theta = positive_number(d.get("rope_local_base_freq", defaults.get("rope_local_base_freq", theta)),
                              "rope_local_base_freq", where)
    factor = 1.0
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "linear":
            factor = positive_number(scaling.get("factor"), "rope_scaling.factor", where)
        elif kind not in ("default", None):
            raise GemmaQuantError(
                f"config.json: rope scaling type {kind!r} is not supported (allowed: default, linear)"
            )
    return theta, local_theta, factor


def _layer_types(d: dict, model_type: str, n_layers: int, where: str) -> tuple[str, ...]:
    lt = d.get("layer_types")
    if lt is not None:
        if not isinstance(lt, list) or len(lt) != n_layers or any(t not in (SLIDING, FULL) for t in lt):
            raise GemmaQuantError(
                f"{where}: 'layer_types' must list {n_layers} entries of "
                f"'{SLIDING}'/'{FULL}', got {lt!r}"
            )
        return tuple(lt)
    if model_type == "gemma":
        return (FULL,) * n_layers
    if model_type == "gemma2":  # even layers slide (transformers: not bool(layer_idx % 2))
        return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n_layers))
    pattern = int_in_range(d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6)),
                      "sliding_window_pattern", where)
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n_layers))


def _refuse_other_gemma(raw: dict, where: str) -> None:
    """One line naming the architecture of a Gemma-family checkpoint we do not handle."""
    mt = raw.get("model_type")
    archs = raw.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    family = OTHER_GEMMA_FAMILIES.get(mt) if isinstance(mt, str) else None
    if family is None and arch is not None and arch not in SUPPORTED_ARCHITECTURES and (
            arch.startswith("Gemma") or mt in SUPPORTED_MODEL_TYPES):
        family = OTHER_GEMMA_HEADS.get(arch, "a Gemma model with a head other than the causal LM")
    if family is not None:
        raise GemmaQuantError(
            f"{where}: {family} (architectures {arch or '?'}, model_type {mt!r}) is not supported; "
            f"gemmaquant handles {', '.join(SUPPORTED_ARCHITECTURES)}")


def config_from_dict(raw: dict, where: str = "config.json") -> GemmaConfig:
    """Validate a config.json object. Any value of the wrong JSON type is a one-line error."""
    try:
        return _config_from_dict(raw, where)
    except GemmaQuantError:
        raise
    except RecursionError:
        raise GemmaQuantError(f"{where}: nested too deeply") from None
    except (TypeError, ValueError, AttributeError, KeyError, ArithmeticError) as e:
        raise GemmaQuantError(f"{where}: a value has the wrong type or range ({type(e).__name__}: {e})") from None


def _config_from_dict(raw: dict, where: str) -> GemmaConfig:
    if not isinstance(raw, dict):
        raise GemmaQuantError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    mt = raw.get("model_type")
    _refuse_other_gemma(raw, where)
    d = raw
    multimodal = False
    if mt in ("gemma3", "gemma4"):  # Gemma{3,4}ForConditionalGeneration: the text model sits in text_config
        if not isinstance(raw.get("text_config"), dict):
            raise GemmaQuantError(f"{where}: model_type {mt!r} without a 'text_config' object")
        d = dict(raw["text_config"])
        mt += "_text"
        d.setdefault("model_type", mt)
        multimodal = True
        # Multimodal configs may omit the text defaults: fill them from the text config class.
        d.setdefault("vocab_size", 262208 if mt == "gemma3_text" else GEMMA4_DEFAULTS["vocab_size"])
    if mt == "gemma4_text":
        d = {"vocab_size": GEMMA4_DEFAULTS["vocab_size"], "intermediate_size": 9216, **d}
    if mt not in [text_type for text_type, _ in GENERATIONS.values()]:
        raise GemmaQuantError(
            f"{where}: model_type {mt!r} is not a Gemma text model "
            f"(allowed: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    dflt = _DEFAULTS[mt]
    n_layers = required_int(d, "num_hidden_layers", where)
    heads = required_int(d, "num_attention_heads", where, dflt.get("num_attention_heads"))
    kv_heads = required_int(d, "num_key_value_heads", where, d.get("num_key_value_heads") or
                             dflt.get("num_key_value_heads", heads))
    if heads % kv_heads:
        raise GemmaQuantError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    hidden = required_int(d, "hidden_size", where)
    head_dim = required_int(d, "head_dim", where, dflt.get("head_dim", hidden // heads))
    gemma4 = gemma4_fields(d, n_layers, heads, kv_heads, head_dim, where, raw if multimodal else {}) \
        if mt == "gemma4_text" else {}
    theta, local_theta, factor = gemma4.pop("rope") if gemma4 else _rope(d, mt, where)
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu", "gelu_tanh"):
        raise GemmaQuantError(
            f"{where}: hidden_activation {act!r} is not supported (allowed: gelu_pytorch_tanh)"
        )
    qpas = d.get("query_pre_attn_scalar", dflt.get("query_pre_attn_scalar")) if mt != "gemma" else None
    if gemma4:
        qpas = 1.0  # Gemma 4 attends with scaling 1.0: the q/k norms set the scale
    window = d.get("sliding_window", dflt.get("sliding_window")) if mt != "gemma" else None
    layer_types = gemma4.pop("layer_types") if gemma4 else _layer_types(d, mt, n_layers, where)
    if window is not None:
        window = int_in_range(window, "sliding_window", where)
    elif SLIDING in layer_types:
        raise GemmaQuantError(f"{where}: sliding layers need a positive 'sliding_window'")
    softcaps = {}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        v = d.get(key, dflt.get(key))
        softcaps[key] = None if v is None else positive_number(v, key, where)
    return GemmaConfig(
        model_type=mt,
        vocab_size=required_int(d, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=required_int(d, "intermediate_size", where),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=positive_number(d.get("rms_norm_eps", dflt["rms_norm_eps"]), "rms_norm_eps", where, hi=1),
        max_position_embeddings=required_int(d, "max_position_embeddings", where, dflt["max_position_embeddings"]),
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_scaling_factor=factor,
        query_pre_attn_scalar=(positive_number(qpas, "query_pre_attn_scalar", where) if qpas is not None
                               else float(head_dim)),
        attn_logit_softcapping=softcaps["attn_logit_softcapping"],
        final_logit_softcapping=softcaps["final_logit_softcapping"],
        sliding_window=window,
        layer_types=layer_types,
        qk_norm=mt in ("gemma3_text", "gemma4_text"),
        sandwich_norms=mt != "gemma",
        multimodal=multimodal,
        bos_token_id=d.get("bos_token_id", raw.get("bos_token_id", 2)),
        eos_token_id=d.get("eos_token_id", raw.get("eos_token_id", 1)),
        pad_token_id=d.get("pad_token_id", raw.get("pad_token_id", 0)),
        raw=raw,
        **gemma4,
    )


def load_config(path: str | Path) -> GemmaConfig:
    from .inputs import read_json

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise GemmaQuantError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return config_from_dict(read_json(path, "config.json"), where=str(path))
