"""Gemma 1/2/3 text-model configuration: one frozen dataclass of flags for the three generations.

Reads a Hugging Face config.json written by transformers 4.x (rope_theta, rope_local_base_freq,
sliding_window_pattern, query_pre_attn_scalar) or 5.x (rope_parameters, layer_types). A multimodal
Gemma 3 checkpoint (model_type "gemma3" with a `text_config`) is read as its text model; its tensors
carry a `language_model.` prefix that the checkpoint reader strips.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GemmaQuantError

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
# The one generation table: generation -> (HF model_type of the text model, GGUF general.architecture).
GENERATIONS = {1: ("gemma", "gemma"), 2: ("gemma2", "gemma2"), 3: ("gemma3_text", "gemma3")}
SLIDING, FULL = "sliding_attention", "full_attention"

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
}


@dataclass(frozen=True)
class GemmaConfig:
    model_type: str  # "gemma" | "gemma2" | "gemma3_text" (a multimodal "gemma3" maps here)
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
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def generation(self) -> int:
        return next(g for g, (mt, _) in GENERATIONS.items() if mt == self.model_type)

    @property
    def gguf_arch(self) -> str:
        return GENERATIONS[self.generation][1]

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each Linear in a decoder layer, by HF suffix."""
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

    def norm_names(self) -> tuple[str, ...]:
        names = ["input_layernorm", "post_attention_layernorm"]
        if self.sandwich_norms:
            names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        if self.qk_norm:
            names += ["self_attn.q_norm", "self_attn.k_norm"]
        return tuple(names)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the HF text checkpoint (names without any multimodal prefix)."""
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
            "model.norm.weight": (self.hidden_size,),
        }
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            for suffix, shape in self.linear_shapes().items():
                shapes[p + suffix + ".weight"] = shape
            for norm in self.norm_names():
                dim = self.head_dim if norm.startswith("self_attn.") else self.hidden_size
                shapes[p + norm + ".weight"] = (dim,)
        return shapes

    def param_count(self) -> int:
        return sum(math.prod(s) for s in self.expected_shapes().values())


# The range each size may take. Gemma's largest (27B) has 62 layers, hidden 5376, ffn 21504, 32
# heads, a 262k vocabulary and a 128k context; the bounds leave room for larger models while refusing
# values that would build huge structures (1e9 layers: a billion-entry tuple) or overflow a GGUF uint32.
INT_RANGES = {
    "num_hidden_layers": (1, 1024), "hidden_size": (1, 1 << 17), "intermediate_size": (1, 1 << 20),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "head_dim": (1, 1 << 14),
    "vocab_size": (1, 1 << 24), "max_position_embeddings": (1, 1 << 24), "sliding_window": (1, 1 << 24),
    "sliding_window_pattern": (1, 1024),
}


def _int_in(v: Any, key: str, where: str) -> int:
    lo, hi = INT_RANGES[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= v <= hi:
        raise GemmaQuantError(f"{where}: '{key}' must be an integer in {lo}..{hi}, got {v!r}")
    return int(v)


def _positive_int(d: dict, key: str, where: str, default: Any = None) -> int:
    v = d.get(key, default)
    if v is None:
        raise GemmaQuantError(f"{where}: missing required key '{key}'")
    return _int_in(v, key, where)


def _number(v: Any, key: str, where: str, hi: float | None = None) -> float:
    """A finite number > 0 (and < hi): zero, negative or NaN values here gave NaN or 1e10 perplexities."""
    ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) and v > 0
    if not ok or (hi is not None and v >= hi):
        rng = f"a number with 0 < {key} < {hi:g}" if hi is not None else "a finite number > 0"
        raise GemmaQuantError(f"{where}: '{key}' must be {rng}, got {v!r}")
    return float(v)


def _rope(d: dict, model_type: str, where: str) -> tuple[float, float, float]:
    """(global theta, local theta, global linear factor) from 4.x keys or 5.x rope_parameters."""
    defaults = _DEFAULTS[model_type]
    rp = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if isinstance(rp, dict) and (FULL in rp or SLIDING in rp):  # 5.x, per layer type
        full = rp.get(FULL, {}) or {}
        local = rp.get(SLIDING, {}) or {}
        theta = _number(full.get("rope_theta", defaults["rope_theta"]), "rope_theta", where)
        local_theta = _number(local.get("rope_theta", defaults.get("rope_local_base_freq", theta)),
                              "rope_local_base_freq", where)
        scaling = full
    else:
        if isinstance(rp, dict):  # 5.x, one set for all layers
            theta = _number(rp.get("rope_theta", d.get("rope_theta", defaults["rope_theta"])), "rope_theta", where)
            scaling = rp
        else:
            theta = _number(d.get("rope_theta", defaults["rope_theta"]), "rope_theta", where)
        local_theta = _number(d.get("rope_local_base_freq", defaults.get("rope_local_base_freq", theta)),
                              "rope_local_base_freq", where)
    factor = 1.0
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "linear":
            factor = _number(scaling.get("factor"), "rope_scaling.factor", where)
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
    pattern = _int_in(d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6)),
                      "sliding_window_pattern", where)
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n_layers))


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
    d = raw
    multimodal = False
    if mt == "gemma3":  # Gemma3ForConditionalGeneration: the text model sits in text_config
        if not isinstance(raw.get("text_config"), dict):
            raise GemmaQuantError(f"{where}: model_type 'gemma3' without a 'text_config' object")
        d = dict(raw["text_config"])
        d.setdefault("model_type", "gemma3_text")
        multimodal = True
        mt = "gemma3_text"
        # Multimodal configs may omit the text defaults: fill them from the Gemma3TextConfig class.
        d.setdefault("vocab_size", 262208)
    if mt not in ("gemma", "gemma2", "gemma3_text"):
        raise GemmaQuantError(
            f"{where}: model_type {mt!r} is not a Gemma text model "
            f"(allowed: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    dflt = _DEFAULTS[mt]
    n_layers = _positive_int(d, "num_hidden_layers", where)
    heads = _positive_int(d, "num_attention_heads", where, dflt.get("num_attention_heads"))
    kv_heads = _positive_int(d, "num_key_value_heads", where, d.get("num_key_value_heads") or
                             dflt.get("num_key_value_heads", heads))
    if heads % kv_heads:
        raise GemmaQuantError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    hidden = _positive_int(d, "hidden_size", where)
    head_dim = _positive_int(d, "head_dim", where, dflt.get("head_dim", hidden // heads))
    theta, local_theta, factor = _rope(d, mt, where)
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu", "gelu_tanh"):
        raise GemmaQuantError(
            f"{where}: hidden_activation {act!r} is not supported (allowed: gelu_pytorch_tanh)"
        )
    qpas = d.get("query_pre_attn_scalar", dflt.get("query_pre_attn_scalar")) if mt != "gemma" else None
    window = d.get("sliding_window", dflt.get("sliding_window")) if mt != "gemma" else None
    layer_types = _layer_types(d, mt, n_layers, where)
    if window is not None:
        window = _int_in(window, "sliding_window", where)
    elif SLIDING in layer_types:
        raise GemmaQuantError(f"{where}: sliding layers need a positive 'sliding_window'")
    softcaps = {}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        v = d.get(key, dflt.get(key))
        softcaps[key] = None if v is None else _number(v, key, where)
    return GemmaConfig(
        model_type=mt,
        vocab_size=_positive_int(d, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_positive_int(d, "intermediate_size", where),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_number(d.get("rms_norm_eps", dflt["rms_norm_eps"]), "rms_norm_eps", where, hi=1),
        max_position_embeddings=_positive_int(d, "max_position_embeddings", where, dflt["max_position_embeddings"]),
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_scaling_factor=factor,
        query_pre_attn_scalar=_number(qpas, "query_pre_attn_scalar", where) if qpas is not None else float(head_dim),
        attn_logit_softcapping=softcaps["attn_logit_softcapping"],
        final_logit_softcapping=softcaps["final_logit_softcapping"],
        sliding_window=window,
        layer_types=layer_types,
        qk_norm=mt == "gemma3_text",
        sandwich_norms=mt != "gemma",
        multimodal=multimodal,
        bos_token_id=d.get("bos_token_id", raw.get("bos_token_id", 2)),
        eos_token_id=d.get("eos_token_id", raw.get("eos_token_id", 1)),
        pad_token_id=d.get("pad_token_id", raw.get("pad_token_id", 0)),
        raw=raw,
    )


def load_config(path: str | Path) -> GemmaConfig:
    from .inputs import read_json

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise GemmaQuantError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return config_from_dict(read_json(path, "config.json"), where=str(path))
