"""Tensor names of multimodal Gemma 3 (Gemma3ForConditionalGeneration) checkpoints.

transformers writes four layouts of the same model (all load identically in transformers 5):

    layout  text                     vision                              projector                   untied head
    A       language_model.model.*   vision_tower.vision_model.*         multi_modal_projector.*     language_model.lm_head.weight
    B       model.language_model.*   model.vision_tower.vision_model.*   model.multi_modal_projector.*  lm_head.weight
    C       language_model.model.*   vision_tower.{embeddings,encoder,post_layernorm}.*  multi_modal_projector.*  (as A)
    D       model.language_model.*   model.vision_tower.{embeddings,...}.*  model.multi_modal_projector.*  (as B)

A is Google's release (and what transformers 5 writes back for a model loaded from A), B what transformers
4.52-4.57 saved, C what transformers 5 saves for a model built from a config, D its
`save_original_format=False`. Every reader accepts A: transformers 4.5x and 5, vLLM (whose module tree is
A's), and llama.cpp's `convert_hf_to_gguf.py --mmproj` (the only layout it converts). So every output we
write uses A's names, whatever the source's layout.
"""

from __future__ import annotations

TEXT_A = "language_model."  # + the text model's own names (model.layers..., lm_head.weight)
VISION_A = "vision_tower.vision_model."
PROJECTOR_A = "multi_modal_projector."
# ignore patterns for compressed-tensors: whatever the reader's names (A's, transformers' runtime
# `model.vision_tower.…`, vLLM's), the vision tower and projector stay unquantized
CT_IGNORE = ["re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


# Gemma 4 (Gemma4ForConditionalGeneration): one layout (`model.language_model.`, `model.vision_tower.`,
# `model.audio_tower.`, `model.embed_vision.`, `model.embed_audio.`), which transformers, vLLM (its
# hf_to_vllm_mapper) and llama.cpp all read, so outputs keep the source's names. vLLM quantizes the
# towers and embedders of E2B/E4B (vision width a multiple of 64) unless ignored.
GEMMA4_MEDIA = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
CT_IGNORE_GEMMA4 = ["re:.*vision_tower.*", "re:.*audio_tower.*", "re:.*embed_vision.*", "re:.*embed_audio.*"]


def media_name(stored: str, generation: int) -> str | None:
    """The name a non-text tensor of a multimodal checkpoint goes by: Gemma 3's layout A name
    (`vision_name`), Gemma 4's stored name; None for a tensor of neither."""
    if generation == 4:
        return stored if stored.startswith(GEMMA4_MEDIA) or stored.startswith(
            tuple(p.removeprefix("model.") for p in GEMMA4_MEDIA)) else None
    return vision_name(stored)


def vision_name(stored: str) -> str | None:
    """Layout A name of a vision tower / projector tensor of any layout; None for other tensors."""
    name = stored.removeprefix("model.") if stored.startswith(("model.vision_tower.", "model.multi_modal_projector.")) \
        else stored
    if name.startswith(PROJECTOR_A):
        return name
    if name.startswith(VISION_A):
        return name
    if name.startswith("vision_tower."):
        return VISION_A + name[len("vision_tower."):]
    return None


def layout(stored_names) -> str:
    """Which of the layouts A/B/C/D a multimodal checkpoint's names are (for messages and reports)."""
    names = list(stored_names)
    runtime = any(n.startswith("model.language_model.") for n in names)
    nested = any(".vision_model." in n for n in names if "vision_tower." in n)
    return {(False, True): "A", (True, True): "B", (False, False): "C", (True, False): "D"}[(runtime, nested)]
