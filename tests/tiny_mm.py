"""Tiny random multimodal Gemma 3 (Gemma3ForConditionalGeneration) checkpoints in the four tensor-name
layouts transformers writes (gemmaquant/multimodal.py), every weight file saved by transformers itself.

C is transformers 5's `save_pretrained` of a model built from a config, D the same with
`save_original_format=False`; A (Google's release) and B (transformers 4.52-4.57) are C's tensors renamed,
then loaded and saved again by transformers, which writes back the layout it loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

LAYOUTS = ("A", "B", "C", "D")
TEXT = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, sliding_window=8, query_pre_attn_scalar=64, bos_token_id=2,
            eos_token_id=1, pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, layer_norm_eps=1e-6, vision_use_head=False)
MM_TOKENS = 4  # 4x4 patches pooled 2x2


def _a(name: str) -> str:
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def _b(name: str) -> str:
    name = _a(name)
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    return "lm_head.weight" if name == "language_model.lm_head.weight" else "model." + name


def to_a(name: str) -> str:
    """Any layout's tensor name under layout A (llama.cpp's converter reads only A)."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    return _a(name.removeprefix("model."))


def image_processor(size: int) -> dict:
    return {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
            "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 1 / 255,
            "size": {"height": size, "width": size}}


def make_tiny_mm(root: Path, *, untied: bool = False, dtype=torch.bfloat16, vision: dict | None = None,
                 seed: int = 0) -> dict[str, Path]:
    """layout -> checkpoint directory `root/<layout>/tiny-gemma-3-mm` (same directory name everywhere, so
    llama.cpp's general.name is the same), with processor files as transformers 5 writes them (A and B
    also get a flat preprocessor_config.json, as Google's release has) and the tiny SentencePiece tokenizer."""
    import transformers
    from safetensors.torch import load_file, save_file

    from tests.export.gguf.llamacpp_ref import tiny_tokenizer

    vis = {**VISION, **(vision or {})}
    cfg = transformers.Gemma3Config(text_config=dict(TEXT, tie_word_embeddings=not untied), vision_config=vis,
                                    mm_tokens_per_image=MM_TOKENS, boi_token_index=261, eoi_token_index=262,
                                    image_token_index=263, tie_word_embeddings=not untied)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norms start at zero in HF: randomize everything so (1 + w) matters
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in n else 0.05))
    model = model.to(dtype)
    dirs = {k: root / k / "tiny-gemma-3-mm" for k in LAYOUTS}
    model.save_pretrained(dirs["C"])
    model.save_pretrained(dirs["D"], save_original_format=False)
    for key, rename in (("A", _a), ("B", _b)):
        tmp = root / f"{key}-renamed"
        shutil.copytree(dirs["C"], tmp)
        st = tmp / "model.safetensors"
        save_file({rename(k): v for k, v in load_file(st).items()}, st, metadata={"format": "pt"})
        transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp, dtype=dtype).save_pretrained(dirs[key])
        shutil.rmtree(tmp)
    proc = image_processor(vis["image_size"])
    for key, d in dirs.items():
        (d / "processor_config.json").write_text(json.dumps(
            {"image_processor": proc, "image_seq_length": MM_TOKENS, "processor_class": "Gemma3Processor"}, indent=2))
        if key in ("A", "B"):
            (d / "preprocessor_config.json").write_text(json.dumps(
                {**proc, "image_seq_length": MM_TOKENS, "processor_class": "Gemma3Processor"}, indent=2))
        (d / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
                                               "{{ m['content'] }}<end_of_turn>\n{% endfor %}")
        tiny_tokenizer(d)
    return dirs
