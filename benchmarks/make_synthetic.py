"""Synthetic Gemma checkpoints with the exact config and tensor shapes of real models (benchmarks only).

    python benchmarks/make_synthetic.py gemma-2-9b /tmp/synth/gemma-2-9b
    python benchmarks/make_synthetic.py gemma-4-31b /tmp/synth/gemma-4-31b-L2 --layers 2
    python benchmarks/make_synthetic.py --list

Each output directory looks like the hub's: config.json as the official repo ships it, bf16 weights
sharded at ≤ 5 GB (save_pretrained's "5GB", counted in 10^9 bytes) with model.safetensors.index.json,
and the tokenizer files of the demo model (Gemma 3 270M, 262144 pieces).

Tokenizer: Gemma 1/2 have vocab_size 256000 and Gemma 3 262144, while the only tokenizer available
offline is Gemma 3's. For Gemma 1/2 its SentencePiece model is cut to its first vocab_size pieces (and
its tokenizer.json left out), so the token list length equals the embedding rows, as with the real
tokenizers (whose first 256000 pieces are not the same strings, which no benchmark here reads);
gemmaquant refuses a tokenizer with more tokens than the embedding has rows.

Gemma 4 (gemma-4-e4b, gemma-4-31b, gemma-4-26b-a4b): the text model as `Gemma4ForCausalLM`, config.json
as transformers >= 5.15 saves it (`per_layer_config` for the full-attention layers' head_dim and kv
heads, no `global_head_dim` key; tests/benchmarks check that transformers reads it back unchanged).
The real checkpoints are `Gemma4ForConditionalGeneration` with a vision (and on E4B audio) tower, which
the text quantization copies or drops; the towers are left out here. Gemma 4 ships tokenizer.json only:
no Gemma 4 tokenizer is available offline, so the synthetic gets the demo model's tokenizer.json (a
262144-entry byte-fallback BPE, the model type, size and decoder Gemma 4's has; the media tokens'
strings differ) and tokenizer_config.json, and no tokenizer.model. Norms and scales are drawn around 1
(Gemma 4 multiplies by w itself).

`--layers N` writes the first N decoder layers and says N in config.json, so that a real-shaped model
fits a small disk (31B in bf16 is 62 GB, 26B-A4B 52 GB). For Gemma 4 the N layers follow the real
layer pattern but the last is a full-attention layer (transformers forces that), so N = 2 gives one
layer of each shape; KV sharing keeps the real share of shared layers that still has a producer.
`--sparse` writes the headers and leaves the data as holes (zeros; no disk used, seconds): for
plan-only checks (`--dry-run`, `inspect`) of full-size shapes.

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

_S, _F = "sliding_attention", "full_attention"
# Gemma4TextConfig as transformers 5.23 saves it (keys in its order); per_layer_config and layer_types
# are filled in per model by gemma4_config().
_G4 = dict(architectures=["Gemma4ForCausalLM"], attention_bias=False, attention_dropout=0.0, attention_k_eq_v=False,
           bos_token_id=2, dtype="bfloat16", enable_moe_block=False, eos_token_id=1, final_logit_softcapping=30.0,
           head_dim=256, hidden_activation="gelu_pytorch_tanh", hidden_size=None, hidden_size_per_layer_input=0,
           initializer_range=0.02, intermediate_size=None, layer_types=None, max_position_embeddings=262144,
           model_type="gemma4_text", moe_intermediate_size=None, num_attention_heads=None, num_experts=None,
           num_hidden_layers=None, num_key_value_heads=None, num_kv_shared_layers=0, pad_token_id=0,
           per_layer_config=None, rms_norm_eps=1e-6,
           rope_parameters={_F: {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
                            _S: {"rope_theta": 10000.0, "rope_type": "default"}},
           sliding_window=1024, tie_word_embeddings=True, top_k_experts=None, transformers_version="5.23.0",
           use_bidirectional_attention="vision", use_cache=True, use_double_wide_mlp=False, vocab_size=262144,
           vocab_size_per_layer_input=262144)
# The released models (transformers' convert_gemma4_weights.py variants): layer pattern period, the
# full layers' head_dim and (k_eq_v models) kv heads.
GEMMA4 = {
    "gemma-4-e4b": dict(period=6, global_head_dim=512, global_kv=None, cfg=dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_attention_heads=8,
        num_key_value_heads=2, hidden_size_per_layer_input=256, num_kv_shared_layers=18, sliding_window=512,
        max_position_embeddings=131072, use_bidirectional_attention=None)),
    "gemma-4-31b": dict(period=6, global_head_dim=512, global_kv=4, cfg=dict(
        hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32,
        num_key_value_heads=16, attention_k_eq_v=True)),
    "gemma-4-26b-a4b": dict(period=6, global_head_dim=512, global_kv=2, cfg=dict(
        hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
        num_key_value_heads=8, attention_k_eq_v=True, enable_moe_block=True, num_experts=128, top_k_experts=8,
        moe_intermediate_size=704)),
}


def gemma4_config(model: str, layers: int | None = None) -> dict:
    """config.json of a Gemma 4 synthetic, all layers or the first `layers` (ending on a full layer)."""
    v = GEMMA4[model]
    cfg = {**_G4, **v["cfg"]}
    full_n = cfg["num_hidden_layers"]
    n = full_n if layers is None else layers
    types = [_F if (i + 1) % v["period"] == 0 else _S for i in range(full_n)][:n]
    types[-1] = _F
    shared = round(cfg["num_kv_shared_layers"] * n / full_n)
    while shared and not set(types[n - shared:]) <= set(types[:n - shared]):
        shared -= 1  # every type a shared layer reuses needs a producer among the others
    plc = {}
    for i, t in enumerate(types):
        if t == _F:
            e = {"head_dim": v["global_head_dim"]}
            if cfg["attention_k_eq_v"] and v["global_kv"] is not None and v["global_kv"] != cfg["num_key_value_heads"]:
                e["num_key_value_heads"] = v["global_kv"]
            plc[str(i).zfill(len(str(n - 1)))] = e  # transformers pads the keys to one width
    cfg.update(num_hidden_layers=n, layer_types=types, num_kv_shared_layers=shared, per_layer_config=plc)
    return cfg


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


def gemma4_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors `Gemma4ForCausalLM.save_pretrained` writes for `cfg` (tied head not saved)."""
    h, n_l, p = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["hidden_size_per_layer_input"] or 0
    nh, first_shared = cfg["num_attention_heads"], n_l - cfg["num_kv_shared_layers"]
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    if p:
        out.append(("model.embed_tokens_per_layer.weight", (cfg["vocab_size_per_layer_input"], n_l * p)))
    for n, t in enumerate(cfg["layer_types"]):
        over = {int(k): v for k, v in cfg["per_layer_config"].items()}.get(n, {})
        pre = f"model.layers.{n}."
        hd, nkv = over.get("head_dim", cfg["head_dim"]), over.get("num_key_value_heads", cfg["num_key_value_heads"])
        i = cfg["intermediate_size"] * (2 if cfg["use_double_wide_mlp"] and n >= first_shared else 1)
        out += [(pre + "self_attn.q_proj.weight", (nh * hd, h)), (pre + "self_attn.q_norm.weight", (hd,))]
        if n < first_shared:
            out += [(pre + "self_attn.k_proj.weight", (nkv * hd, h)), (pre + "self_attn.k_norm.weight", (hd,))]
            if not (cfg["attention_k_eq_v"] and t == _F):
                out.append((pre + "self_attn.v_proj.weight", (nkv * hd, h)))
        out += [(pre + "self_attn.o_proj.weight", (h, nh * hd)), (pre + "mlp.gate_proj.weight", (i, h)),
                (pre + "mlp.up_proj.weight", (i, h)), (pre + "mlp.down_proj.weight", (h, i))]
        norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"]
        if cfg["enable_moe_block"]:
            e, ie = cfg["num_experts"], cfg["moe_intermediate_size"]
            out += [(pre + "router.proj.weight", (e, h)), (pre + "router.scale", (h,)),
                    (pre + "router.per_expert_scale", (e,)), (pre + "experts.gate_up_proj", (e, 2 * ie, h)),
                    (pre + "experts.down_proj", (e, h, ie))]
            norms += ["pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"]
        if p:
            out += [(pre + "per_layer_input_gate.weight", (p, h)), (pre + "per_layer_projection.weight", (h, p))]
            norms.append("post_per_layer_input_norm")
        out += [(pre + nm + ".weight", (h,)) for nm in norms] + [(pre + "layer_scalar", (1,))]
    out.append(("model.norm.weight", (h,)))
    if p:
        out += [("model.per_layer_model_projection.weight", (n_l * p, h)),
                ("model.per_layer_projection_norm.weight", (p,))]
    return out


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF parameter names and shapes in save_pretrained's order (module order)."""
    if cfg["model_type"] == "gemma4_text":
        return gemma4_shapes(cfg)
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
    return 0.05 if name.endswith("norm.weight") or name.endswith(_ONES) else 0.02


# Gemma 4 multiplies by these (norms, router scales, layer scalar), so they sit around 1, not 0.
_ONES = ("norm.weight", "layer_scalar", "router.scale", "per_expert_scale")


def _write_shard(path: Path, tensors, pool: torch.Tensor, gen: torch.Generator, gemma4: bool = False,
                 sparse: bool = False) -> None:
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + 2 * _numel(shape)]}
        pos += 2 * _numel(shape)
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js)
        if sparse:
            f.truncate(8 + len(js) + pos)
            return
        for name, shape in tensors:
            left, std = _numel(shape), _std(name)
            one = gemma4 and name.endswith(_ONES)
            while left:
                n = min(left, CHUNK_VALUES)
                off = int(torch.randint(0, POOL_VALUES - n + 1, (1,), generator=gen))
                chunk = pool[off:off + n] * std  # bf16 × float: stays bf16
                if one:
                    chunk = chunk + 1.0
                f.write(chunk.view(torch.uint8).numpy().data)
                left -= n


def model_config(model: str, layers: int | None = None) -> dict:
    if model in GEMMA4:
        return gemma4_config(model, layers)
    cfg = dict(CONFIGS[model])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def make_checkpoint(model: str, out: Path, seed: int = 0, tokenizer_dir: Path | None = None,
                    layers: int | None = None, sparse: bool = False) -> Path:
    """Write the synthetic `model` (a key of CONFIGS or GEMMA4) to directory `out`, all its decoder
    layers or the first `layers`; `sparse`: headers only, the data left as holes. Returns `out`."""
    cfg = model_config(model, layers)
    if model not in GEMMA4:
        cfg["_name_or_path"] = f"synthetic/{model}"
    if tokenizer_dir is None:
        from gemmaquant.formats.demo import ensure_demo_checkpoint

        tokenizer_dir = ensure_demo_checkpoint()
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    pool = None if sparse else torch.empty(POOL_VALUES, dtype=torch.float32).normal_(generator=gen).to(torch.bfloat16)
    shapes = tensor_shapes(cfg)
    shards = shard_plan(shapes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, tensors in zip(names, shards):
        _write_shard(out / fname, tensors, pool, gen, model in GEMMA4, sparse)
        print(f"  {fname}: {len(tensors)} tensors", file=sys.stderr)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(2 * _numel(s) for _, s in shapes)},
                 "weight_map": {n: fn for fn, ts in zip(names, shards) for n, _ in ts}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    rows = cfg["vocab_size"]
    for f in TOKENIZER_FILES:
        if model in GEMMA4 and f == "tokenizer.model":
            continue  # Gemma 4 ships tokenizer.json only (the converters would count the SPM pieces)
        if f == "tokenizer.json" and model not in GEMMA4 and rows < 262144:
            continue  # Gemma 1/2 (256000 rows): converted from tokenizer.model, cut below
        if (tokenizer_dir / f).is_file():
            shutil.copyfile(tokenizer_dir / f, out / f)
    if (out / "tokenizer.model").is_file() and rows < 262144:
        (out / "tokenizer.model").write_bytes(first_pieces((out / "tokenizer.model").read_bytes(), rows))
    return out


def first_pieces(proto: bytes, n: int) -> bytes:
    """A SentencePiece ModelProto with only its first n pieces (field 1), every other field as it was:
    Gemma 1/2's 256000-row embeddings get as many tokens (gemmaquant refuses a tokenizer with more
    tokens than the embedding has rows, as a tokenizer of another model)."""
    def varint(i):
        v = shift = 0
        while True:
            b = proto[i]
            v |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                return v, i

    out, i, kept = bytearray(), 0, 0
    while i < len(proto):
        start = i
        key, i = varint(i)
        wire = key & 7
        if wire == 2:
            length, i = varint(i)
            i += length
        elif wire == 0:
            _, i = varint(i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"tokenizer.model: wire type {wire} at byte {start}")
        if key >> 3 == 1:
            kept += 1
            if kept > n:
                continue
        out += proto[start:i]
    return bytes(out)


def checkpoint_bytes(model: str, layers: int | None = None) -> int:
    return sum(2 * _numel(s) for _, s in tensor_shapes(model_config(model, layers)))


ALL_MODELS = [*CONFIGS, *GEMMA4]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", choices=sorted(ALL_MODELS))
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="write only the first N decoder layers (config.json says N)")
    ap.add_argument("--sparse", action="store_true", help="headers only, data as holes (plan-only checks)")
    ap.add_argument("--list", action="store_true", help="print the models and their bf16 sizes")
    a = ap.parse_args(argv)
    if a.list or a.model is None:
        for m in ALL_MODELS:
            per = (checkpoint_bytes(m, 3) - checkpoint_bytes(m, 2)) / 1e9
            print(f"{m:16s} {checkpoint_bytes(m) / 1e9:7.2f} GB  ({per:.2f} GB per layer)")
        return
    if a.out is None:
        ap.error("give an output directory")
    full = model_config(a.model)["num_hidden_layers"]
    if a.layers is not None and not 2 <= a.layers <= full:
        ap.error(f"--layers must be in 2..{full} for {a.model}")
    need = 0 if a.sparse else checkpoint_bytes(a.model, a.layers)
    free = shutil.disk_usage(a.out.parent if a.out.parent.exists() else Path.cwd()).free
    if free < need + (1 << 30):
        sys.exit(f"{a.out}: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free (try --layers N)")
    make_checkpoint(a.model, a.out, a.seed, layers=a.layers, sparse=a.sparse)


if __name__ == "__main__":
    main()
