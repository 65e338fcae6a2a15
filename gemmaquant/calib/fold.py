"""Exact per-channel rescaling inside a Gemma decoder layer (shared by SmoothQuant and AWQ).

Dividing a Linear's input channel j by s_j and multiplying its weight column j by s_j leaves the layer
function unchanged, provided the division can be folded into whatever produces the input:

  mapping   producer (divide by s)                      consumers (columns × s)
  "qkv"     input_layernorm's (1 + w)                   q_proj, k_proj, v_proj
  "gate_up" pre_feedforward_layernorm's (1 + w)         gate_proj, up_proj
            (Gemma 1: post_attention_layernorm, which feeds the MLP there)
  "o"       v_proj rows                                 o_proj columns (one s per KV channel,
                                                        repeated over the query heads of its group)
  "down"    up_proj rows (the GeGLU product is linear   down_proj columns
            in up's output)

Never into the Gemma 2/3 sandwich post-norms (post_attention_layernorm, post_feedforward_layernorm):
they normalise a Linear's OUTPUT, so a scale there is undone by the RMS and feeds no Linear.

Gemma 1-3 norms compute x̂·(1 + w) in float32 with w stored in bf16; Gemma 4's compute x̂·w. The new
weight is rounded to the stored dtype first, and the effective scale s_eff = (1 + w)/(1 + w') (Gemma 4:
w/w') is derived from the rounded value, so the folded model is the float model up to float32
rounding, whatever the requested s was.

Gemma 4: only the Linears a layer has take part (KV-shared layers: q_proj alone reads the attention
input; k_eq_v full layers: q and k, V being the raw K output, which the column scaling leaves
unchanged). "o" does not apply: every Gemma 4 layer RMS-normalizes V without a weight, which undoes a
per-channel scale folded into v_proj rows (and k_eq_v layers have no v_proj at all).
"""

from __future__ import annotations

import torch

from ..model.gemma import DecoderLayer, RMSNorm

MAPPINGS = ("qkv", "gate_up", "o", "down")


def producer_norm(layer: DecoderLayer, mapping: str) -> str:
    """Attribute name of the norm that produces the input of `mapping` ("qkv" / "gate_up")."""
    if mapping == "qkv":
        return "input_layernorm"
    return "pre_feedforward_layernorm" if layer.sandwich else "post_attention_layernorm"


def consumers(layer: DecoderLayer, mapping: str) -> list[torch.nn.Linear]:
    return [layer.get_submodule(n) for n in consumer_names(mapping, layer)]


def consumer_names(mapping: str, layer: DecoderLayer | None = None) -> list[str]:
    """The Linears reading `mapping`'s input; with `layer`, only those it has (Gemma 4)."""
    names = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "gate_up": ["mlp.gate_proj", "mlp.up_proj"], "o": ["self_attn.o_proj"],
             "down": ["mlp.down_proj"]}[mapping]
    if layer is None:
        return names
    return [n for n in names if hasattr(layer.get_submodule(n.split(".")[0]), n.split(".")[1])]


def applies(layer: DecoderLayer, mapping: str) -> bool:
    """Whether `mapping` can be folded exactly in this layer (module docstring: not "o" on Gemma 4)."""
    return not (mapping == "o" and (layer.self_attn.v_norm or not hasattr(layer.self_attn, "v_proj")))


def kv_to_q(layer: DecoderLayer, s_kv: torch.Tensor) -> torch.Tensor:
    """[kv_dim] per-KV-channel scale → [q_dim] o_proj input scale (head h reads KV group h // rep)."""
    a = layer.self_attn
    rep = a.n_heads // a.n_kv
    return s_kv.view(a.n_kv, a.head_dim).repeat_interleave(rep, dim=0).reshape(-1)


def q_to_kv_max(layer: DecoderLayer, v_q: torch.Tensor) -> torch.Tensor:
    """[q_dim] per-channel statistic → [kv_dim], the max over the query heads sharing a KV head."""
    a = layer.self_attn
    rep = a.n_heads // a.n_kv
    return v_q.view(a.n_kv, rep, a.head_dim).amax(1).reshape(-1)


def fold_into_norm(norm: RMSNorm, s: torch.Tensor, stored_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Set (1 + w') ≈ (1 + w)/s (Gemma 4, no unit offset: w' ≈ w/s) with w' representable in `stored_dtype`.

    Returns (w' in stored_dtype, s_eff [dim] float32) — multiply the consumers' columns by s_eff.
    A channel keeps w' = w (s_eff = 1) when rounding would make its scale zero or flip its sign.
    """
    off = 1.0 if norm.unit_offset else 0.0
    w = norm.weight.detach().float()
    one = off + w
    new = (one / s.float() - off).to(stored_dtype)
    new_one = off + new.float()
    keep = (one == 0) | (new_one == 0) | (torch.sign(new_one) != torch.sign(one))
    new = torch.where(keep, w.to(stored_dtype), new)
    new_one = off + new.float()
    s_eff = torch.where(keep, torch.ones_like(one), one / new_one)
    with torch.no_grad():
        norm.weight.copy_(new.float())
    return new, s_eff


def scale_columns(linears: list[torch.nn.Linear], s: torch.Tensor) -> None:
    with torch.no_grad():
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


def fold(layer: DecoderLayer, mapping: str, s: torch.Tensor, stored_dtype: torch.dtype) \
        -> tuple[torch.Tensor, str | None, torch.Tensor | None]:
    """Apply input scale `s` to `mapping`'s consumers and its inverse to the producer, in place.

    `s` is [in] of the consumers, except for "o" where it is [kv_dim] (one per V channel).
    Returns (s_eff over the consumers' inputs, producer norm attribute or None, its new stored weight).
    """
    if mapping in ("qkv", "gate_up"):
        name = producer_norm(layer, mapping)
        new_w, s_eff = fold_into_norm(getattr(layer, name), s, stored_dtype)
        scale_columns(consumers(layer, mapping), s_eff)
        return s_eff, name, new_w
    s = s.float()
    with torch.no_grad():
        if mapping == "o":
            layer.self_attn.v_proj.weight.div_(s[:, None])
            s = kv_to_q(layer, s)
        elif mapping == "down":
            layer.mlp.up_proj.weight.div_(s[:, None])
        else:
            raise ValueError(f"unknown mapping {mapping!r} (allowed: {', '.join(MAPPINGS)})")
    scale_columns(consumers(layer, mapping), s)
    return s, None, None
