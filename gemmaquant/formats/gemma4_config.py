"""Gemma 4's config.json keys: per-layer geometry, K/V sharing, per-layer inputs, the MoE block and
proportional RoPE, read into the flags of `config.GemmaConfig` (see `gemma4_fields`)."""

from __future__ import annotations

from ..errors import GemmaQuantError
from .config_values import FULL, SLIDING, int_in_range, positive_number, required_int

# Gemma4TextConfig's defaults for the keys only Gemma 4 has.
GEMMA4_DEFAULTS = dict(global_head_dim=512, hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
                       vocab_size=262144, partial_rotary_factor=0.25)


def gemma4_fields(d: dict, n_layers: int, heads: int, kv_heads: int, head_dim: int, where: str,
                  outer: dict) -> dict:
    """The Gemma 4 flags, resolved as transformers 5.23 resolves a Gemma4TextConfig.

    Per-layer geometry comes from `per_layer_config` (what transformers >= 5.15 saves: {"05":
    {"head_dim": 512, "num_key_value_heads": 2}}) or, in Google's original config.json, from
    `global_head_dim` / `num_global_key_value_heads` on full layers -- the latter only with
    `attention_k_eq_v`, as transformers ignores it otherwise. `outer`: the multimodal wrapper's config
    (its media placeholder ids), else {}."""
    g = GEMMA4_DEFAULTS
    lt = d.get("layer_types")
    if lt is None:
        lt = [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)]
    if not isinstance(lt, list) or len(lt) != n_layers or any(t not in (SLIDING, FULL) for t in lt):
        raise GemmaQuantError(f"{where}: 'layer_types' must list {n_layers} entries of '{SLIDING}'/'{FULL}', got {lt!r}")
    layer_types = tuple(lt[:-1]) + (FULL,)  # transformers turns a sliding last layer into a full one
    k_eq_v = bool(d.get("attention_k_eq_v", False))
    hd, nkv = [head_dim] * n_layers, [kv_heads] * n_layers
    plc = d.get("per_layer_config")
    if plc is not None:
        if not isinstance(plc, dict):
            raise GemmaQuantError(f"{where}: 'per_layer_config' must be an object of layer -> overrides")
        for key, o in plc.items():
            i = int(key)
            if not 0 <= i < n_layers or not isinstance(o, dict):
                raise GemmaQuantError(f"{where}: 'per_layer_config' entry {key!r} must name a layer 0..{n_layers - 1} "
                                      "with an object of overrides")
            hd[i] = int_in_range(o.get("head_dim", hd[i]), "head_dim", where)
            nkv[i] = int_in_range(o.get("num_key_value_heads", nkv[i]), "num_key_value_heads", where)
    else:
        ghd = int_in_range(d.get("global_head_dim") or g["global_head_dim"], "global_head_dim", where)
        gkv = d.get("num_global_key_value_heads")
        for i, t in enumerate(layer_types):
            if t == FULL:
                hd[i] = ghd
                if k_eq_v and gkv is not None:
                    nkv[i] = int_in_range(gkv, "num_global_key_value_heads", where)
    for kind in (SLIDING, FULL):  # RoPE tables are per kind: one geometry per kind
        geo = {(hd[i], nkv[i]) for i, t in enumerate(layer_types) if t == kind}
        if len(geo) > 1:
            raise GemmaQuantError(f"{where}: {kind} layers have different head_dim/num_key_value_heads {sorted(geo)}; "
                                  "gemmaquant supports one geometry per layer kind")
    for i in range(n_layers):
        if heads % nkv[i]:
            raise GemmaQuantError(f"{where}: layer {i}: num_attention_heads {heads} is not a multiple of "
                                  f"{nkv[i]} key/value heads")
    n_shared = int_in_range(d.get("num_kv_shared_layers") or 0, "num_kv_shared_layers", where)
    first_shared = n_layers - n_shared
    if n_shared >= n_layers:
        raise GemmaQuantError(f"{where}: 'num_kv_shared_layers' {n_shared} must be below num_hidden_layers {n_layers}")
    for kind in set(layer_types[first_shared:]):
        if kind not in layer_types[:first_shared]:
            raise GemmaQuantError(f"{where}: KV-shared {kind} layers have no earlier {kind} layer to share with")
    ple = int_in_range(d.get("hidden_size_per_layer_input", g["hidden_size_per_layer_input"]) or 0,
                  "hidden_size_per_layer_input", where)
    ple_vocab = int_in_range(d.get("vocab_size_per_layer_input") or g["vocab_size_per_layer_input"],
                        "vocab_size_per_layer_input", where)
    moe = {}
    if d.get("enable_moe_block"):
        moe = {k: required_int(d, k, where)
               for k in ("num_experts", "top_k_experts", "moe_intermediate_size")}
        if moe["top_k_experts"] > moe["num_experts"]:
            raise GemmaQuantError(f"{where}: 'top_k_experts' {moe['top_k_experts']} exceeds num_experts "
                                  f"{moe['num_experts']}")
    if d.get("attention_bias"):
        raise GemmaQuantError(f"{where}: 'attention_bias' true is not supported for Gemma 4 (allowed: false)")
    if d.get("use_bidirectional_attention") == "all":
        raise GemmaQuantError(f"{where}: 'use_bidirectional_attention' 'all' (a bidirectional encoder) is not "
                              "supported (allowed: null, 'vision')")
    return dict(layer_types=layer_types, rope=_gemma4_rope(d, where), norm_unit_offset=False,
                media_token_ids=tuple(i for k in ("image_token_id", "video_token_id", "audio_token_id")
                                      if isinstance(i := outer.get(k), int) and not isinstance(i, bool)),
                layer_head_dims=tuple(hd), layer_kv_heads=tuple(nkv), attention_k_eq_v=k_eq_v,
                num_kv_shared_layers=n_shared, hidden_size_per_layer_input=ple,
                vocab_size_per_layer_input=ple_vocab if ple else 0,
                use_double_wide_mlp=bool(d.get("use_double_wide_mlp", False)), **moe,
                rope_partial_factor=_gemma4_rope_partial(d, where))


def _gemma4_rope_params(d: dict, where: str) -> tuple[dict, dict]:
    rp = d.get("rope_parameters") or {}
    if not isinstance(rp, dict) or not all(isinstance(rp.get(k, {}), dict) for k in (SLIDING, FULL)):
        raise GemmaQuantError(f"{where}: 'rope_parameters' must map '{SLIDING}'/'{FULL}' to objects")
    local = {"rope_type": "default", "rope_theta": 10000.0, **rp.get(SLIDING, {})}
    full = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0, **rp.get(FULL, {})}
    if local["rope_type"] != "default":
        raise GemmaQuantError(f"{where}: sliding-layer rope_type {local['rope_type']!r} is not supported "
                              "(allowed: default)")
    if full["rope_type"] not in ("default", "proportional"):
        raise GemmaQuantError(f"{where}: full-layer rope_type {full['rope_type']!r} is not supported "
                              "(allowed: proportional, default)")
    return local, full


def _gemma4_rope(d: dict, where: str) -> tuple[float, float, float]:
    local, full = _gemma4_rope_params(d, where)
    factor = full.get("factor", 1.0) if full["rope_type"] == "proportional" else 1.0
    return (positive_number(full["rope_theta"], "rope_theta", where),
            positive_number(local["rope_theta"], "rope_theta", where),
            positive_number(factor, "rope_parameters.factor", where))


def _gemma4_rope_partial(d: dict, where: str) -> float:
    _, full = _gemma4_rope_params(d, where)
    if full["rope_type"] != "proportional":
        return 1.0
    v = full.get("partial_rotary_factor", 1.0)
    return positive_number(v, "partial_rotary_factor", where) if v != 1 else 1.0
