"""Synthetic Gemma checkpoints with the exact config and tensor shapes of real models (benchmarks only).

    python benchmarks/make_synthetic.py gemma-2-9b /tmp/synth/gemma-2-9b
    python benchmarks/make_synthetic.py --list

Each output directory looks like the hub's: config.json as the official repo ships it, bf16 weights
sharded at ≤ 5 GB (save_pretrained's "5GB", counted in 10^9 bytes) with model.safetensors.index.json,
and the tokenizer files of the demo model (Gemma 3 270M, 262144 pieces).

Tokenizer: Gemma 1/2 have vocab_size 256000 and Gemma 3 262144, while the only tokenizer available
offline is Gemma 3's. The Gemma 3 SentencePiece model is copied unchanged and config.json keeps the
official vocab_size; both GGUF converters (llama.cpp's `_create_vocab_sentencepiece` and ours) take
the first vocab_size pieces and stop, so the token list length equals the embedding rows, as with the
real tokenizers (whose first 256000 pieces are not the same strings, which no benchmark here reads).

Weights: N(0, std) in bf16 with std 0.02 for Linears and 0.03 for the embedding (the scale of trained
Gemma weights), norms N(0, 0.05) around the stored 0 (HF computes x * (1 + w)). To write 18.5 GB in
minutes on a small machine, every chunk is a random window of one 64 M-value pool of normal numbers
(drawing 9 G independent normals takes minutes at ~50 M values/s): statistically normal everywhere, not
independent across tensors, which timing and memory benchmarks do not notice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import torch

MAX_SHARD = 5 * 10**9
POOL_VALUES = 1 << 26
CHUNK_VALUES = 1 << 24
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_G2 = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", attention_bias=False, attention_dropout=0.0,
           attn_logit_softcapping=50.0, final_logit_softcapping=30.0, bos_token_id=2, eos_token_id=1,
           pad_token_id=0, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
           initializer_range=0.02, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
           sliding_window=4096, cache_implementation="hybrid", torch_dtype="bfloat16", use_cache=True,
           vocab_size=256000)
_G1 = dict(architectures=["GemmaForCausalLM"], model_type="gemma", attention_bias=False, attention_dropout=0.0,
           bos_token_id=2, eos_token_id=1, pad_token_id=0, hidden_act="gelu", hidden_activation=None,
           initializer_range=0.02, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
           rope_scaling=None, torch_dtype="bfloat16", use_cache=True, vocab_size=256000)
_G3 = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", attention_bias=False,
           attention_dropout=0.0, attn_logit_softcapping=None, final_logit_softcapping=None, bos_token_id=2,
           eos_token_id=1, pad_token_id=0, hidden_activation="gelu_pytorch_tanh", initializer_range=0.02,
           max_position_embeddings=32768, query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
           rope_local_base_freq=10000.0, rope_scaling=None, sliding_window=512, sliding_window_pattern=6,
           torch_dtype="bfloat16", use_cache=True, vocab_size=262144)

# Shapes of the official config.json of each repo (google/<name>).
CONFIGS: dict[str, dict] = {
    "gemma-2b": {**_G1, "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
                 "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256},
    "gemma-7b": {**_G1, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
                 "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256},
    "gemma-2-2b": {**_G2, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                   "query_pre_attn_scalar": 256},
    "gemma-2-9b": {**_G2, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
                   "query_pre_attn_scalar": 256},
    # 27B: head_dim 128 but queries scaled by hidden/heads = 144 (query_pre_attn_scalar).
    "gemma-2-27b": {**_G2, "hidden_size": 4608, "intermediate_size": 36864, "num_hidden_layers": 46,
                    "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                    "query_pre_attn_scalar": 144},
    "gemma-3-270m": {**_G3, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
                     "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256},
    "gemma-3-1b": {**_G3, "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
                   "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256},
}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF parameter names and shapes in save_pretrained's order (module order)."""
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q))]
        if cfg["model_type"] == "gemma3_text":
            out += [(p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
        out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
        if cfg["model_type"] != "gemma":
            out += [(p + "pre_feedforward_layernorm.weight", (h,)), (p + "post_feedforward_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_plan(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors, a new shard when the next would pass 5 GB (as save_pretrained splits)."""
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        b = 2 * _numel(shape)
        if cur and size + b > MAX_SHARD:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += b
    shards.append(cur)
    return shards


def _std(name: str) -> float:
    if "embed_tokens" in name:
        return 0.03
    return 0.05 if name.endswith("norm.weight") else 0.02


def _write_shard(path: Path, tensors, pool: torch.Tensor, gen: torch.Generator) -> None:
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + 2 * _numel(shape)]}
        pos += 2 * _numel(shape)
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js)
        for name, shape in tensors:
            left, std = _numel(shape), _std(name)
            while left:
                n = min(left, CHUNK_VALUES)
                off = int(torch.randint(0, POOL_VALUES - n + 1, (1,), generator=gen))
                chunk = pool[off:off + n] * std  # bf16 × float: stays bf16
                f.write(chunk.view(torch.uint8).numpy().data)
                left -= n


def make_checkpoint(model: str, out: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """Write the synthetic `model` (a key of CONFIGS) to directory `out`; returns `out`."""
    cfg = {**CONFIGS[model], "_name_or_path": f"synthetic/{model}"}
    if tokenizer_dir is None:
        from gemmaquant.formats.demo import ensure_demo_checkpoint

        tokenizer_dir = ensure_demo_checkpoint()
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL_VALUES, dtype=torch.float32).normal_(generator=gen).to(torch.bfloat16)
    shapes = tensor_shapes(cfg)
    shards = shard_plan(shapes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, tensors in zip(names, shards):
        _write_shard(out / fname, tensors, pool, gen)
        print(f"  {fname}: {len(tensors)} tensors", file=sys.stderr)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(2 * _numel(s) for _, s in shapes)},
                 "weight_map": {n: fn for fn, ts in zip(names, shards) for n, _ in ts}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).is_file():
            shutil.copyfile(tokenizer_dir / f, out / f)
    return out


def checkpoint_bytes(model: str) -> int:
    return sum(2 * _numel(s) for _, s in tensor_shapes(CONFIGS[model]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", choices=sorted(CONFIGS))
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="print the models and their bf16 sizes")
    a = ap.parse_args(argv)
    if a.list or a.model is None:
        for m in CONFIGS:
            print(f"{m:14s} {checkpoint_bytes(m) / 1e9:7.2f} GB")
        return
    if a.out is None:
        ap.error("give an output directory")
    free = shutil.disk_usage(a.out.parent if a.out.parent.exists() else Path.cwd()).free
    if free < checkpoint_bytes(a.model) + (1 << 30):
        sys.exit(f"{a.out}: needs {checkpoint_bytes(a.model) / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    make_checkpoint(a.model, a.out, a.seed)


if __name__ == "__main__":
    main()
