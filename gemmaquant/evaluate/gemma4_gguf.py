"""Reading a `gemma4` GGUF back: its hyperparameters as a Gemma 4 config, and quantized experts.

What llama.cpp's gemma4 loader takes from the file, mapped back to transformers' terms:
  * per-layer kinds from the `sliding_window_pattern` BOOL array, head dims from `key_length`
    (full layers) / `key_length_swa`, kv heads from `head_count_kv` (a number or a per-layer array),
    the feed-forward width from `feed_forward_length` (an array when double-wide);
  * `attention_k_eq_v` from the file itself: a full layer with keys but no `attn_v` uses V = K;
  * the proportional RoPE share from `rope_freqs` (1 for rotated pairs, 1e30 for the rest);
  * KV sharing from `shared_kv_layers` (llama.cpp reuses layers by position; files where that differs
    from transformers' rule are refused by `check_gemma4`).
"""

from __future__ import annotations

import torch

from ..errors import GemmaQuantError
from ..export.gguf.plan import check_gemma4
from ..formats.config import FULL, GENERATIONS, SLIDING, GemmaConfig, config_from_dict
from ..formats.gguf.reader import GGUFFile
from ..model.gemma4_blocks import Experts
from ..model.qlinear import QuantLinear

ARCH = GENERATIONS[4][1]  # general.architecture of the files read here


def _ints(v, n: int) -> list[int]:
    return [int(x) for x in v] if hasattr(v, "__len__") else [int(v)] * n


def gemma4_config(gf: GGUFFile, vocab: int) -> GemmaConfig:
    a = ARCH

    def need(key: str):
        v = gf.get(f"{a}.{key}")
        if v is None:
            raise GemmaQuantError(f"{gf.path}: metadata key '{a}.{key}' is missing")
        return v

    n = int(need("block_count"))
    pattern = [bool(x) for x in need("attention.sliding_window_pattern")]
    if len(pattern) != n:
        raise GemmaQuantError(f"{gf.path}: '{a}.attention.sliding_window_pattern' has {len(pattern)} entries for "
                              f"{n} layers")
    types = [SLIDING if s else FULL for s in pattern]
    ff = _ints(need("feed_forward_length"), n)
    kv = _ints(need("attention.head_count_kv"), n)
    hd_full, hd_swa = int(need("attention.key_length")), int(need("attention.key_length_swa"))
    shared = int(gf.get(f"{a}.attention.shared_kv_layers", 0))
    first_shared = n - shared
    full_own = [i for i in range(first_shared) if types[i] == FULL]
    k_eq_v = bool(full_own) and all(f"blk.{i}.attn_v.weight" not in gf.tensors for i in full_own)
    swa_kv = next((kv[i] for i in range(n) if types[i] == SLIDING), kv[0])
    per_layer = {str(i): {"head_dim": hd_full, "num_key_value_heads": kv[i]} for i in range(n) if types[i] == FULL}
    raw = {
        "model_type": "gemma4_text", "vocab_size": vocab, "hidden_size": int(need("embedding_length")),
        "num_hidden_layers": n, "num_attention_heads": int(need("attention.head_count")),
        "num_key_value_heads": swa_kv, "head_dim": hd_swa, "intermediate_size": ff[0],
        "use_double_wide_mlp": any(f != ff[0] for f in ff), "layer_types": types, "per_layer_config": per_layer,
        "attention_k_eq_v": k_eq_v, "num_kv_shared_layers": shared,
        "rms_norm_eps": float(gf.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(gf.get(f"{a}.context_length", 131072)),
        "sliding_window": int(need("attention.sliding_window")),
        "final_logit_softcapping": gf.get(f"{a}.final_logit_softcapping"),
        "hidden_size_per_layer_input": int(gf.get(f"{a}.embedding_length_per_layer_input", 0)),
        "vocab_size_per_layer_input": vocab,
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": float(gf.get(f"{a}.rope.freq_base_swa", 10000.0))},
            FULL: {"rope_type": "proportional", "rope_theta": float(gf.get(f"{a}.rope.freq_base", 1e6)),
                   "partial_rotary_factor": _partial_rotary(gf, hd_full)}},
        "bos_token_id": gf.get("tokenizer.ggml.bos_token_id"), "eos_token_id": gf.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": gf.get("tokenizer.ggml.padding_token_id"),
    }
    if gf.get(f"{a}.expert_count"):
        raw.update(enable_moe_block=True, num_experts=int(gf.get(f"{a}.expert_count")),
                   top_k_experts=int(need("expert_used_count")),
                   moe_intermediate_size=int(need("expert_feed_forward_length")))
    cfg = config_from_dict(raw, where=str(gf.path))
    try:
        check_gemma4(cfg)
    except GemmaQuantError as e:
        raise GemmaQuantError(f"{gf.path}: {str(e).split(': ', 1)[1]}") from None
    if any(ff[i] != cfg.intermediate_of(i) for i in range(n)):
        raise GemmaQuantError(f"{gf.path}: '{a}.feed_forward_length' {ff} is not the base width, doubled on the "
                              "KV-shared layers")
    return cfg


def _partial_rotary(gf: GGUFFile, head_dim: int) -> float:
    """The rotated share of the full layers' head dim, from the converter's rope_freqs tensor."""
    if "rope_freqs.weight" not in gf.tensors:
        return 1.0
    f = gf.raw("rope_freqs.weight").reshape(-1).view(torch.float32)
    n = int((f == 1.0).sum())
    if f.numel() != head_dim // 2 or not (torch.all(f[:n] == 1.0) and torch.all(f[n:] >= 1e29)):
        raise GemmaQuantError(f"{gf.path}: tensor 'rope_freqs.weight' is not 1s then 1e30s over {head_dim // 2} "
                              "values (only Gemma 4's proportional RoPE is supported)")
    return 2 * n / head_dim


class QuantExperts(Experts):
    """Experts whose fused weights stay quantized: `gate_up` holds all experts' gate/up rows
    ([E·2I, H]), `down` all down rows ([E·H, I]); each expert dequantizes its own slice per use."""

    def __init__(self, cfg: GemmaConfig, gate_up: QuantLinear, down: QuantLinear):
        torch.nn.Module.__init__(self)
        self.num_experts = cfg.num_experts
        self.rows_gu, self.rows_down = 2 * cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_q, self.down_q = gate_up, down

    def gate_up(self, e: int, like: torch.Tensor) -> torch.Tensor:
        return self.gate_up_q.weight_for(like, e * self.rows_gu, (e + 1) * self.rows_gu)

    def down(self, e: int, like: torch.Tensor) -> torch.Tensor:
        return self.down_q.weight_for(like, e * self.rows_down, (e + 1) * self.rows_down)
