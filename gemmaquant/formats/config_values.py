"""Checks of single config.json values, shared by every generation's parser: each wrong value is one
line naming the key, its allowed range and what was given."""

from __future__ import annotations

import math
import numbers
from typing import Any

from ..errors import GemmaQuantError

SLIDING, FULL = "sliding_attention", "full_attention"  # the two layer kinds of `layer_types`

# The range each size may take. Gemma's largest (27B) has 62 layers, hidden 5376, ffn 21504, 32
# heads, a 262k vocabulary and a 128k context; the bounds leave room for larger models while refusing
# values that would build huge structures (1e9 layers: a billion-entry tuple) or overflow a GGUF uint32.
INT_RANGES = {
    "num_hidden_layers": (1, 1024), "hidden_size": (1, 1 << 17), "intermediate_size": (1, 1 << 20),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "head_dim": (1, 1 << 14),
    "vocab_size": (1, 1 << 24), "max_position_embeddings": (1, 1 << 24), "sliding_window": (1, 1 << 24),
    "sliding_window_pattern": (1, 1024), "global_head_dim": (1, 1 << 14), "num_global_key_value_heads": (1, 1024),
    "num_kv_shared_layers": (0, 1023), "hidden_size_per_layer_input": (0, 1 << 14),
    "vocab_size_per_layer_input": (1, 1 << 24), "num_experts": (1, 1 << 12), "top_k_experts": (1, 1 << 12),
    "moe_intermediate_size": (1, 1 << 20),
}


def int_in_range(v: Any, key: str, where: str) -> int:
    lo, hi = INT_RANGES[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= v <= hi:
        raise GemmaQuantError(f"{where}: '{key}' must be an integer in {lo}..{hi}, got {v!r}")
    return int(v)


def required_int(d: dict, key: str, where: str, default: Any = None) -> int:
    v = d.get(key, default)
    if v is None:
        raise GemmaQuantError(f"{where}: missing required key '{key}'")
    return int_in_range(v, key, where)


def positive_number(v: Any, key: str, where: str, hi: float | None = None) -> float:
    """A finite number > 0 (and < hi): zero, negative or NaN values here gave NaN or 1e10 perplexities."""
    ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) and v > 0
    if not ok or (hi is not None and v >= hi):
        rng = f"a number with 0 < {key} < {hi:g}" if hi is not None else "a finite number > 0"
        raise GemmaQuantError(f"{where}: '{key}' must be {rng}, got {v!r}")
    return float(v)
