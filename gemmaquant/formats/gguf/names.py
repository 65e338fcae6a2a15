"""Hugging Face ↔ GGUF tensor names for Gemma 1/2/3 text models (docs/gguf-gemma.md §1.5).

The mapping is llama.cpp's `gguf-py/gguf/tensor_mapping.py` restricted to Gemma. The trap is
`post_attention_layernorm`: in Gemma 1 it is the norm *before* the MLP (there are only two norms per
block), so it maps to `ffn_norm`; in Gemma 2/3 it is the sandwich norm after attention and maps to
`post_attention_norm`, while `pre_feedforward_layernorm` takes `ffn_norm`.
"""

from __future__ import annotations

import re

from ...errors import GemmaQuantError

# HF suffix inside `model.layers.N.` -> GGUF suffix inside `blk.N.`, per generation.
_BLOCK_COMMON = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_BLOCK = {
    1: {**_BLOCK_COMMON, "post_attention_layernorm.weight": "ffn_norm.weight"},
    2: {**_BLOCK_COMMON,
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "pre_feedforward_layernorm.weight": "ffn_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
}
_BLOCK[3] = {**_BLOCK[2], "self_attn.q_norm.weight": "attn_q_norm.weight",
             "self_attn.k_norm.weight": "attn_k_norm.weight"}
# Gemma 4: the converter keeps the experts fused (gate rows first) and names the router's scales
# after the tensors they act on; `layer_scalar` gets a `.weight` suffix.
_BLOCK[4] = {**_BLOCK[3], "layer_scalar": "layer_output_scale.weight",
             "per_layer_input_gate.weight": "inp_gate.weight", "per_layer_projection.weight": "proj.weight",
             "post_per_layer_input_norm.weight": "post_norm.weight",
             "router.proj.weight": "ffn_gate_inp.weight", "router.scale": "ffn_gate_inp.scale",
             "router.per_expert_scale": "ffn_down_exps.scale",
             "experts.gate_up_proj": "ffn_gate_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
             "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
             "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
             "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight"}

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
           "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
           "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight"}
# Gemma 4's full-attention RoPE frequency factors: made by the converter, no Hugging Face tensor.
ROPE_FREQS = "rope_freqs.weight"
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_name(hf_name: str, generation: int) -> str | None:
    """GGUF name of an HF text tensor; None for `lm_head.weight` in Gemma 1/2, which the converter
    drops (the loader reuses token_embd). Gemma 3 keeps an explicit lm_head as `output.weight`."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    if hf_name == "lm_head.weight":
        return "output.weight" if generation == 3 else None
    m = _HF_BLOCK.match(hf_name)
    if m and m.group(2) in _BLOCK[generation]:
        return f"blk.{m.group(1)}.{_BLOCK[generation][m.group(2)]}"
    raise GemmaQuantError(f"tensor '{hf_name}' has no GGUF name for a Gemma {generation} model")


def hf_name(gguf: str, generation: int) -> str:
    """Inverse of `gguf_name` (`output.weight` -> `lm_head.weight`)."""
    if gguf == "output.weight":
        return "lm_head.weight"
    for hf, g in _GLOBAL.items():
        if g == gguf:
            return hf
    m = _GGUF_BLOCK.match(gguf)
    if m:
        for hf, g in _BLOCK[generation].items():
            if g == m.group(2):
                return f"model.layers.{m.group(1)}.{hf}"
    raise GemmaQuantError(f"GGUF tensor '{gguf}' has no Hugging Face name for a Gemma {generation} model")


def llama_order_key(name: str) -> tuple[int, bytes]:
    """llama.cpp's tensor order (`llama_model_loader::weight_name_comparer`): tensors outside blocks
    first (layer -1), then `blk.N` by N; by bytewise name within the same layer."""
    m = _GGUF_BLOCK.match(name)
    return (int(m.group(1)) if m else -1, name.encode())
