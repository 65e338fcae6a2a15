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
