"""What llama.cpp's Gemma graphs compute from a GGUF that `convert_hf_to_gguf.py` (and so we) write, where
that differs from the Hugging Face model.

llama.cpp's Gemma metadata has no key for two settings that some checkpoints change:
* the query scale. `src/models/gemma{2,3}.cpp` scale queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads)
  for the layer count of the 27B size (46 layers for Gemma 2, 62 for Gemma 3); transformers uses
  query_pre_attn_scalar^-1/2.
* which layers slide. The converter writes `attention.sliding_window` but never
  `attention.sliding_window_pattern`, so llama.cpp's default applies: layer i slides iff i % n < n - 1,
  with n = 6 (Gemma 3) or 2 (Gemma 2); a Gemma 3 with no sliding layer gets no window key, all global.

Our GGUF must stay byte-identical to the converter's, so such a checkpoint still converts; these notes say
so at quantize time (naming key and value) and explain `compare`'s Δ. The GGUF reader
(`evaluate/artifact.py`'s `gguf_config`) derives the same values from the file's keys.
"""

from __future__ import annotations

import dataclasses

from ..config import FULL, SLIDING, GemmaConfig

BIG_LAYERS = {2: 46, 3: 62}  # the 27B layer counts, where llama.cpp uses hidden / heads
SWA_PATTERN = {2: 2, 3: 6}  # llama.cpp's load_swa_pattern default per architecture
_SHOWN = 8  # layer indices listed in a note


def llama_cpp_query_scalar(cfg: GemmaConfig) -> float:
    """The x in llama.cpp's 1/sqrt(x) query scale for this model."""
    if cfg.generation == 4:  # f_attention_scale = 1.0, as transformers' scaling
        return cfg.query_pre_attn_scalar
    if cfg.generation in BIG_LAYERS and cfg.num_hidden_layers == BIG_LAYERS[cfg.generation]:
        return float(cfg.hidden_size // cfg.num_attention_heads)
    return float(cfg.head_dim)


def llama_cpp_layer_types(cfg: GemmaConfig) -> tuple[str, ...]:
    """The attention kind per layer llama.cpp uses for the converter's GGUF of `cfg`."""
    n = cfg.num_hidden_layers
    if cfg.generation == 4:  # the converter writes the per-layer sliding_window_pattern array
        return tuple(cfg.layer_types)
    if cfg.generation == 1 or (cfg.generation == 3 and SLIDING not in cfg.layer_types):
        return (FULL,) * n  # Gemma 3: no window key written, so no SWA at all
    p = SWA_PATTERN[cfg.generation]
    return tuple(SLIDING if i % p < p - 1 else FULL for i in range(n))


def llama_cpp_config(cfg: GemmaConfig) -> GemmaConfig:
    """`cfg` as llama.cpp's graph runs it from the GGUF (our forward pass with this config is what
    llama.cpp computes, up to its kernels' rounding)."""
    return dataclasses.replace(cfg, query_pre_attn_scalar=llama_cpp_query_scalar(cfg),
                               layer_types=llama_cpp_layer_types(cfg))


def _layers(types: tuple[str, ...], kind: str) -> str:
    idx = [i for i, t in enumerate(types) if t == kind]
    shown = ", ".join(map(str, idx[:_SHOWN])) + (", …" if len(idx) > _SHOWN else "")
    return f"[{shown}]"


def differences(hf: GemmaConfig, ran: GemmaConfig, where: str) -> list[str]:
    """One line per setting in which `ran` (what llama.cpp computes) differs from the HF model `hf`."""
    arch = hf.gguf_arch
    notes = []
    if hf.query_pre_attn_scalar != ran.query_pre_attn_scalar:
        notes.append(
            f"{where}: query_pre_attn_scalar is {hf.query_pre_attn_scalar:g}, but llama.cpp's {arch} graph has no "
            f"key for it and scales queries by 1/sqrt({ran.query_pre_attn_scalar:g}) (head_dim, or hidden/heads "
            "for the 27B layer count): the GGUF computes a different model than transformers")
    if hf.layer_types != ran.layer_types:
        rule = f"i % {SWA_PATTERN[hf.generation]} == {SWA_PATTERN[hf.generation] - 1}" \
            if SLIDING in ran.layer_types else "no sliding window key"
        notes.append(
            f"{where}: layer_types puts full attention at layers {_layers(hf.layer_types, FULL)}, but "
            f"convert_hf_to_gguf.py writes no {arch}.attention.sliding_window_pattern and llama.cpp uses full "
            f"attention at layers {_layers(ran.layer_types, FULL)} ({rule}): the GGUF computes a different model "
            "than transformers")
    return notes


def gguf_notes(cfg: GemmaConfig, where: str) -> list[str]:
    """The quantize-time warnings for a GGUF of `cfg` (empty for every released Gemma)."""
    return differences(cfg, llama_cpp_config(cfg), where)
