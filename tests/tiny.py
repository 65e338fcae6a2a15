"""Tiny random-weight Gemma 1/2/3 checkpoints written by transformers (test-only reference)."""

from __future__ import annotations

from pathlib import Path

import torch

# name -> (transformers config class name, model class name, config kwargs)
TINY = {
    "gemma1-mha": ("GemmaConfig", "GemmaForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16)),
    "gemma1-mqa": ("GemmaConfig", "GemmaForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
        query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
        sliding_window_pattern=2, query_pre_attn_scalar=32, rope_theta=1e6, rope_local_base_freq=1e4)),
    # a fine-tune saved with its own LM head (tie_word_embeddings false): lm_head.weight is stored
    "gemma3-untied": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
        query_pre_attn_scalar=32, tie_word_embeddings=False)),
    "gemma3-scaled": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, sliding_window=6,
        sliding_window_pattern=3, query_pre_attn_scalar=48, rope_theta=1e6,
        rope_scaling={"rope_type": "linear", "factor": 8.0})),
    # the compressed-tensors tests' model (tests/evaluate/test_artifact.py); every model test runs on it too
    "ct-gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=8, sliding_window_pattern=3, query_pre_attn_scalar=32)),
}


def make_tiny(name: str, out_dir: Path, dtype=torch.float32, seed: int = 0):
    """Random model saved as an HF checkpoint; returns the transformers model (eager attention)."""
    import transformers

    cfg_cls, model_cls, kwargs = TINY[name]
    cfg = getattr(transformers, cfg_cls)(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # norms start at zero in HF: randomize everything so (1 + w) matters
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in n else 0.08))
    model = model.to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model
