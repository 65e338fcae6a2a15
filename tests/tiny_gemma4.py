"""Tiny random-weight Gemma 4 checkpoints written by transformers (test-only reference).

One per feature combination of the released models:
  dense        31B-like: k_eq_v full layers with their own kv-head count, no PLE
  dense-kv     the same without attention_k_eq_v (full layers keep v_proj)
  e2b          E2B-like: per-layer inputs, the last 4 of 7 layers share K/V (producers 1 sliding and
               2 full, the layout llama.cpp assumes), double-wide MLP on the shared layers
  moe          26B-A4B-like: 16 experts, top 4, beside the dense MLP (8 experts would trip
               llama-quantize's Mixtral special case)
  e2b-mm       the E2B-like text model inside Gemma4ForConditionalGeneration, with vision and audio
  moe-mm       the MoE-like text model in the wrapper (the released 26B-A4B is multimodal)
  dense-mm     the 31B-like text model in the wrapper with a vision tower only (no audio, as the 31B and
               26B-A4B), its vision encoder standardizing (std_bias/std_scale) with clipped Linears
  e2b-p32      the E2B-like one with 32-wide per-layer inputs (rows a budget can choose types for)
  *-256        256-wide variants (K-quant rules without fallback; head dims vLLM's CPU attention runs)
global_head_dim differs from head_dim: llama.cpp's converter asserts it (and real models have 512/256).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

VOCAB = 320
S, F = "sliding_attention", "full_attention"
MEDIA_IDS = (265, 266, 267, 268)  # boi, eoi, image, audio in the tiny tokenizer (the wrapper pads them)
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, global_head_dim=32, sliding_window=8, max_position_embeddings=512,
            final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
VARIANTS = {
    "dense": dict(num_hidden_layers=6, layer_types=[S, S, F, S, S, F], hidden_size_per_layer_input=0,
                  attention_k_eq_v=True, num_global_key_value_heads=1),
    "dense-kv": dict(num_hidden_layers=6, layer_types=[S, S, F, S, S, F], hidden_size_per_layer_input=0,
                     attention_k_eq_v=False),
    "e2b": dict(num_hidden_layers=7, layer_types=[S, S, F, S, S, S, F], hidden_size_per_layer_input=16,
                vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=4, use_double_wide_mlp=True,
                num_key_value_heads=1),
    "moe": dict(num_hidden_layers=4, layer_types=[S, F, S, F], hidden_size_per_layer_input=0,
                attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True, num_experts=16,
                top_k_experts=4, moe_intermediate_size=32),
}
# Rows of 256: the K-quant rules without fallback (Q6_K bumps of ffn_down/_exps, per_layer_token_embd).
WIDE = dict(hidden_size=256, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
            global_head_dim=256)
VARIANTS["moe-256"] = {**VARIANTS["moe"], **WIDE, "moe_intermediate_size": 256}
VARIANTS["e2b-256"] = {**VARIANTS["e2b"], **WIDE, "hidden_size_per_layer_input": 256}
# 3 layers keep the imatrix-only presets' searches short; head dims vLLM's CPU attention runs (not 16)
VARIANTS["dense-256"] = {**VARIANTS["dense"], **WIDE, "num_hidden_layers": 3, "layer_types": [S, F, F]}
# The smallest 256-wide MoE for the imatrix-only presets (our IQ2/IQ1 searches are slow in Python):
# 4 experts (not 8: llama-quantize's Mixtral rules), 2 layers
VARIANTS["moe-256-small"] = {**VARIANTS["moe-256"], "num_hidden_layers": 2, "layer_types": [S, F],
                             "num_experts": 4, "top_k_experts": 2}
# E2B-like with 32-wide per-layer inputs: every PLE tensor's rows (per_layer_token_embd: 7 x 32, proj: 32)
# are a multiple of 32, so a size budget chooses their types (at 16 wide llama.cpp's fallback keeps F16)
VARIANTS["e2b-p32"] = {**VARIANTS["e2b"], "hidden_size_per_layer_input": 32}
# multimodal name -> its text variant (the released 26B-A4B is a multimodal MoE)
WRAPPED = {"e2b-mm": "e2b", "moe-mm": "moe", "moe-256-mm": "moe-256", "dense-mm": "dense", "e2b-256-mm": "e2b-256"}
VISION_ONLY = {"dense-mm": dict(standardize=True, use_clipped_linears=True)}  # vision_config extras, no audio
ALL = ["dense", "dense-kv", "e2b", "moe", "e2b-mm"]  # the forward-pass combinations


def tiny_tokenizer(out: Path) -> None:
    """A 320-token BPE tokenizer.json (Gemma 4 ships no tokenizer.model) with the media specials."""
    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    for t in ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|image>", "<image|>", "<|image|>", "<|audio|>"]:
        vocab[t] = len(vocab)
    letters = "\u2581abcdefghijklmnopqrstuvwxyz"
    for c in letters:
        vocab[c] = len(vocab)
    merges = []
    for a in letters[:6]:
        for b in letters[1:6]:
            if len(vocab) < VOCAB:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    while len(vocab) < VOCAB:
        vocab[f"x{len(vocab)}"] = len(vocab)
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True,
                         extra_special_tokens={"image_token": "<|image|>", "boi_token": "<|image>",
                                               "eoi_token": "<image|>", "audio_token": "<|audio|>"})
    tok.save_pretrained(out)


def _randomize(model, seed: int) -> None:
    """Norms and scales near 1 (Gemma 4 multiplies by w itself), weights small, layer scalars varied.
    q/k norms near head_dim^-1/4, as trained ones keep scores O(1) under attention scaling 1.0: at 1
    the scores reach ±head_dim, attention is an argmax, and llama.cpp's bf16/Q8 activation rounding
    alone moves a 256-wide model's logits by 15-50 %."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_((1.0 + 0.3 * torch.randn(p.shape, generator=g)) * p.numel() ** -0.25)
            elif "norm" in n or n.endswith("scale"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for n, b in model.named_buffers():
            if n.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def text_config(variant: str):
    from transformers import Gemma4TextConfig

    cfg = Gemma4TextConfig(**{**BASE, **VARIANTS[variant]})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def make_tiny_gemma4(name: str, out: Path, dtype=torch.float32, seed: int = 0):
    """Random Gemma 4 checkpoint (+ tokenizer) saved by transformers; returns the transformers model
    in float32 with eager attention and experts (the implementations our forward pass mirrors)."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if name in WRAPPED:
        # pooling_kernel_size 3: llama.cpp's Gemma 4 vision encoder pools 3x3 whatever the config says
        cfg = transformers.Gemma4Config(
            text_config=text_config(WRAPPED[name]),
            vision_config=transformers.Gemma4VisionConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=3, position_embedding_size=64,
                **VISION_ONLY.get(name, {})),
            audio_config=None if name in VISION_ONLY else transformers.Gemma4AudioConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                output_proj_dims=48),
            boi_token_id=265, eoi_token_id=266, image_token_id=267, video_token_id=267, audio_token_id=268,
            boa_token_id=268, eoa_token_index=268)
        cfg._attn_implementation = "eager"
        cfg._experts_implementation = "eager"
        model = transformers.Gemma4ForConditionalGeneration(cfg)
    else:
        model = transformers.Gemma4ForCausalLM(text_config(name))
    model.eval()
    _randomize(model, seed)
    for n, b in model.named_buffers():  # clipped-linear bounds save as ±inf 0-d tensors otherwise
        if b.dim() == 0 and not torch.isfinite(b):
            b.fill_(-1e4 if n.endswith("_min") else 1e4)
    model.to(dtype).save_pretrained(out)
    tiny_tokenizer(out)
    if name in WRAPPED:  # the mmproj converter needs image_mean/image_std
        (out / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "Gemma4ImageProcessor", "image_mean": [0.0, 0.0, 0.0],
             "image_std": [1.0, 1.0, 1.0], "patch_size": 4}))
    return model.float()


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@contextlib.contextmanager
def per_expert_conversion():
    """transformers (5.23) reads Gemma 4 experts only fused: while this is active, checkpoints with
    per-expert Linears (`experts.{e}.gate_proj` …, what vLLM and compressed-tensors expect) load into
    `experts.gate_up_proj` / `experts.down_proj` (gate rows first). Test-only, and undone on exit:
    save_pretrained applies the mapping in reverse, so a tiny checkpoint saved meanwhile would be split."""
    from transformers import conversion_mapping as cm
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    key = "gemma4_text"
    before = cm.get_checkpoint_conversion_mapping(key)
    user = key in cm.USER_REGISTERED_MAPPINGS
    cm.register_checkpoint_conversion_mapping(key, [
        WeightConverter(source_patterns=["experts.*.gate_proj.weight", "experts.*.up_proj.weight"],
                        target_patterns="experts.gate_up_proj", operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
        WeightConverter(source_patterns="experts.*.down_proj.weight", target_patterns="experts.down_proj",
                        operations=[MergeModulelist(dim=0)]),
    ], overwrite=True)
    try:
        yield
    finally:
        if before is not None:
            cm.register_checkpoint_conversion_mapping(key, before, overwrite=True)
        else:
            cm._checkpoint_conversion_mapping_cache.pop(key, None)
        if not user:
            cm.USER_REGISTERED_MAPPINGS.discard(key)
