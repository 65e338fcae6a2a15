"""What differs between Gemma 3's and Gemma 4's mmproj, as data: tensor names, value transforms, forced
types, hyperparameter defaults (the converter's `Gemma3VisionModel` and `Gemma4VisionAudioModel` over
their shared `MmprojModel` base; docs/gguf-gemma.md §8). mmproj.py runs one pipeline over these rules.

Names: Gemma 3's are its layout A names (formats/multimodal.py), Gemma 4's the stored names with the
`model.` prefix the converter's renames expect. A name maps to (GGUF name, transform), or None for a
tensor the converter drops (SigLIP's `head.*`); anything else is refused, naming the tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import GemmaQuantError

# value transforms (applied in the source's float dtype, as the converter's torch code runs them)
PLUS_ONE = "plus_one"  # Gemma 3's soft-embedding RMSNorm stores w, llama.cpp wants 1 + w
SOFTPLUS = "softplus"  # Gemma 4 audio's per_dim_scale: llama.cpp wants softplus(w)
PATCH_CHW = "patch_chw"  # Gemma 4's patch Linear [H, p*p*3] (HWC) -> the conv kernel [H, 3, p, p]
SQUEEZE_DW = "squeeze_dw"  # depthwise Conv1d [C, 1, k] -> [C, k]
CLIP_BOUNDS = (".input_min", ".input_max", ".output_min", ".output_max")  # clipped Linears' 0-d buffers

# -- Gemma 3: SigLIP + the Gemma 3 projector -----------------------------------------------------------
_G3_GLOBAL = {
    "multi_modal_projector.mm_input_projection_weight": ("mm.input_projection.weight", None),
    "multi_modal_projector.mm_soft_emb_norm.weight": ("mm.soft_emb_norm.weight", PLUS_ONE),
}
_G3_VISION = "vision_tower.vision_model."
_G3_PARTS = {"embeddings.patch_embedding": "v.patch_embd", "embeddings.position_embedding": "v.position_embd",
             "post_layernorm": "v.post_ln"}
_G3_BLOCK = {"layer_norm1": "ln1", "layer_norm2": "ln2", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
_G3_BLOCK_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gemma3_name(hf_name: str) -> tuple[str, str | None] | None:
    if hf_name in _G3_GLOBAL:
        return _G3_GLOBAL[hf_name]
    if not hf_name.startswith(_G3_VISION):
        raise GemmaQuantError(f"tensor '{hf_name}' is not part of Gemma 3's vision tower or projector")
    rest = hf_name[len(_G3_VISION):]
    if rest.startswith("head."):
        return None
    for hf, g in _G3_PARTS.items():
        if rest.startswith(hf + "."):
            return g + rest[len(hf):], None
    m = _G3_BLOCK_RE.match(rest)
    if m and m.group(2) in _G3_BLOCK:
        return f"v.blk.{m.group(1)}.{_G3_BLOCK[m.group(2)]}.{m.group(3)}", None
    raise GemmaQuantError(f"tensor '{hf_name}' has no llama.cpp mmproj name (not a SigLIP tower tensor)")


# -- Gemma 4: its own vision encoder, the conformer audio encoder, one embedder per medium ---------------
_G4_GLOBAL = {  # module -> GGUF module
    "model.vision_tower.patch_embedder.input_proj": "v.patch_embd",
    "model.vision_tower.patch_embedder.position_embedding_table": "v.position_embd",
    "model.vision_tower.std_bias": "v.std_bias",
    "model.vision_tower.std_scale": "v.std_scale",
    "model.embed_vision.embedding_projection": "mm.input_projection",
    "model.audio_tower.subsample_conv_projection.input_proj_linear": "a.input_projection",
    "model.audio_tower.output_proj": "a.pre_encode.out",
    "model.embed_audio.embedding_projection": "mm.a.input_projection",
}
_G4_VISION_BLOCK = {
    "input_layernorm": "ln1", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_out", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "attn_post_norm", "pre_feedforward_layernorm": "ln2", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "ffn_post_norm",
    "layer_scalar": "out_scale",
}
_G4_AUDIO_BLOCK = {
    "feed_forward1.ffw_layer_1": "ffn_up", "feed_forward1.ffw_layer_2": "ffn_down",
    "feed_forward1.pre_layer_norm": "ffn_norm", "feed_forward1.post_layer_norm": "ffn_post_norm",
    "feed_forward2.ffw_layer_1": "ffn_up_1", "feed_forward2.ffw_layer_2": "ffn_down_1",
    "feed_forward2.pre_layer_norm": "ffn_norm_1", "feed_forward2.post_layer_norm": "ffn_post_norm_1",
    "lconv1d.linear_start": "conv_pw1", "lconv1d.linear_end": "conv_pw2", "lconv1d.depthwise_conv1d": "conv_dw",
    # llama.cpp's names for the two lconv norms are each other's; clip.cpp loads them crosswise
    "lconv1d.pre_layer_norm": "conv_norm", "lconv1d.conv_norm": "norm_conv",
    "norm_pre_attn": "attn_pre_norm", "norm_post_attn": "attn_post_norm", "norm_out": "ln2",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.post": "attn_out", "self_attn.relative_k_proj": "attn_k_rel", "self_attn.per_dim_scale": "per_dim_scale",
}
_G4_BLOCK_RE = re.compile(r"^model\.(vision_tower\.encoder|audio_tower)\.layers\.(\d+)\.(.+)$")
_G4_SUBSAMPLE_RE = re.compile(r"^model\.audio_tower\.subsample_conv_projection\.layer(\d+)\.(conv|norm)$")
# parameters stored without a suffix: the converter appends ".weight" to these (std_bias/std_scale keep none)
_G4_BARE_WEIGHT = ("per_dim_scale", "position_embedding_table", "layer_scalar")
_G4_SUFFIXES = (".weight", ".bias", *CLIP_BOUNDS)


def _g4_split(name: str) -> tuple[str, str]:
    """(module, GGUF suffix): clipped Linears keep their weight one level down (`….linear.weight`)."""
    if name.endswith(".linear.weight"):
        return name[: -len(".linear.weight")], ".weight"
    for s in _G4_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)], s
    return name, ".weight" if name.endswith(_G4_BARE_WEIGHT) else ""


def gemma4_name(hf_name: str) -> tuple[str, str | None]:
    name = hf_name if hf_name.startswith("model.") else "model." + hf_name
    module, suffix = _g4_split(name)
    gguf_module = _G4_GLOBAL.get(module)
    if gguf_module is None and (m := _G4_SUBSAMPLE_RE.match(module)):
        gguf_module = f"a.conv1d.{m.group(1)}" + (".norm" if m.group(2) == "norm" else "")
    if gguf_module is None and (m := _G4_BLOCK_RE.match(module)):
        table, prefix = (_G4_VISION_BLOCK, "v") if m.group(1).startswith("vision") else (_G4_AUDIO_BLOCK, "a")
        if m.group(3) in table:
            gguf_module = f"{prefix}.blk.{m.group(2)}.{table[m.group(3)]}"
    if gguf_module is None:
        raise GemmaQuantError(f"tensor '{hf_name}' has no llama.cpp mmproj name (not a tensor of Gemma 4's vision "
                              "or audio tower or their embedders that convert_hf_to_gguf.py converts)")
    transform = None
    if suffix == ".weight":
        transform = {"v.patch_embd": PATCH_CHW}.get(gguf_module)
        if module.endswith("lconv1d.depthwise_conv1d"):
            transform = SQUEEZE_DW
        elif module.endswith("self_attn.per_dim_scale"):
            transform = SOFTPLUS
    return gguf_module + suffix, transform


def _g4_audio_conv(hf_name: str) -> bool:
    """The converter keeps the audio tower's convolutions F32; its test reads `".conv" in name or
    ("_conv" in name and ".weight" in name)`, which also catches every subsample_conv_projection weight."""
    return ("audio_tower" in hf_name or "embed_audio" in hf_name) and (
        ".conv" in hf_name or ("_conv" in hf_name and ".weight" in hf_name))


@dataclass(frozen=True)
class MmprojRules:
    generation: int
    name: Callable[[str], tuple[str, str | None] | None]
    forced_f16: tuple[str, ...]  # substrings of the HF name whose tensors are F16 whatever the type
    forced_f32: tuple[str, ...]  # … F32 whatever the type
    forced_f32_if: Callable[[str], bool] | None  # a predicate on the HF name for more F32 tensors
    vision_defaults: dict  # the vision config class's defaults (the converter reads configs through transformers)
    image_size: int | None  # written instead of the config's (Gemma 4: 224, "unused, but set to avoid error")
    finite_bounds: bool  # whether ±inf is refused in clip bounds too (Gemma 4's unclipped Linears store ±inf)


GEMMA3 = MmprojRules(
    generation=3, name=gemma3_name, forced_f16=("input_projection",), forced_f32=(".embeddings.",), forced_f32_if=None,
    # SiglipVisionConfig's
    vision_defaults=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         image_size=224, patch_size=16, layer_norm_eps=1e-6),
    image_size=None, finite_bounds=True)
GEMMA4 = MmprojRules(
    generation=4, name=gemma4_name, forced_f16=(), forced_f32=("position_embedding_table",),
    forced_f32_if=_g4_audio_conv,
    # Gemma4VisionConfig's; no layer_norm_eps there (its `rms_norm_eps` is not what the converter reads)
    vision_defaults=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                         patch_size=16, layer_norm_eps=1e-6, pooling_kernel_size=3),
    image_size=224, finite_bounds=False)
# Gemma4AudioConfig's, plus the converter's fallbacks for the keys it reads and the config lacks
GEMMA4_AUDIO_DEFAULTS = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, input_feat_size=128,
                             layer_norm_eps=1e-6)
GEMMA4_PROJECTORS = ("gemma4v", "gemma4a")  # clip.vision.projector_type / clip.audio.projector_type
CLIP_N_MERGE = 3  # clip.cpp's gemma4v pooling (no key the converter writes changes it)
CLIP_ROPE_THETA = 100.0  # clip.cpp's gemma4v rope base, likewise fixed


def rules_for(generation: int) -> MmprojRules:
    return GEMMA4 if generation == 4 else GEMMA3


def transformed_shape(transform: str | None, shape: tuple[int, ...], hf_name: str) -> tuple[int, ...]:
    """The written shape (HF order; GGUF ne is its reverse); refuses shapes the transform cannot take."""
    if len(shape) == 0:
        return (1,)  # a 0-d buffer becomes a 1-element tensor
    if transform == PATCH_CHW:
        p = int((shape[-1] // 3) ** 0.5)
        if len(shape) != 2 or 3 * p * p != shape[1]:
            raise GemmaQuantError(f"tensor '{hf_name}' has shape {list(shape)}; expected [hidden, 3·p·p] (a "
                                  "patch Linear over p×p RGB pixels)")
        return (shape[0], 3, p, p)
    if transform == SQUEEZE_DW:
        if len(shape) != 3 or shape[1] != 1:
            raise GemmaQuantError(f"tensor '{hf_name}' has shape {list(shape)}; expected [channels, 1, kernel] "
                                  "(a depthwise Conv1d)")
        return (shape[0], shape[2])
    return tuple(shape)


def apply_transform(transform: str | None, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The converter's value change for a tensor, in x's dtype (f32, or f16 for an f16 source)."""
    if transform == PLUS_ONE:
        x = x + 1
    elif transform == SOFTPLUS:
        x = torch.nn.functional.softplus(x)
    elif transform == PATCH_CHW:
        h, _, p, _ = shape
        x = x.reshape(h, p, p, 3).permute(0, 3, 1, 2)
    return x.reshape(shape).contiguous()
