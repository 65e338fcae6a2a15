"""Open a quantized artifact — a GGUF file (ours or llama.cpp's), one of our compressed-tensors
directories, or a plain bf16 HF directory — as a `Gemma` running the built-in forward pass.

Quantized weights stay packed (see model/qlinear.py); the tied embedding / LM head is a QuantEmbedding
so a 262k-row table is never expanded to float32 at once. Norm weights are kept in float32.

GGUF hyperparameters follow what llama.cpp's loader does, not what HF configs say
(docs/gguf-gemma.md §1.2): SWA pattern 2 (gemma2) / 6 (gemma3) unless a pattern key is stored,
gemma2 window 4096 when absent, sliding-layer RoPE base 10000 when `rope.freq_base_swa` is absent,
queries scaled by 1/sqrt(head_dim) except the 27B sizes (46 gemma2 / 62 gemma3 layers), which use
1/sqrt(n_embd/n_head); norms are stored +1 and converted back to HF's (1 + w) form.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..formats.config import FULL, GENERATIONS, SLIDING, GemmaConfig, config_from_dict
from ..errors import GemmaQuantError
from ..formats.gguf.reader import GGUFFile
from ..numerics.ggml.types import BLOCK, F16_FIELDS, GGMLType
from ..model.qlinear import DenseLinear, GGMLLinear, QuantEmbedding, QuantLinear
from .quantized import Artifact, assemble, linear_stats

GGUF_ARCHS = {arch: mt for mt, arch in GENERATIONS.values()}  # general.architecture -> model_type


def artifact_kind(path: str | Path) -> str:
    p = Path(path)
    if p.exists() and not p.is_dir():
        from ..formats.inputs import open_input

        with open_input(p, "a model file") as fh:
            if fh.read(4) == b"GGUF":
                return "gguf"
        raise GemmaQuantError(f"{p}: not a GGUF file and not a model directory")
    if p.is_dir() and (p / "config.json").is_file():
        from ..formats.inputs import read_json

        qc = read_json(p / "config.json", "config.json").get("quantization_config")
        if qc is None:
            return "hf"
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if method != "compressed-tensors":
            raise GemmaQuantError(f"{p}: quantization_config.quant_method {method!r} is not supported "
                                  "(allowed: compressed-tensors)")
        return "compressed-tensors"
    return "hf"  # 'demo', a hub id, or a path formats/checkpoint.py explains


def model_info(path: str) -> tuple[GemmaConfig, Path]:
    """(config, path on disk) of a model argument without loading any weight: the GGUF header, a
    compressed-tensors config.json, or the HF checkpoint's config and headers (for numbers that
    must be checked against the model before work starts, and for the output guard)."""
    kind = artifact_kind(path)
    if kind == "gguf":
        gf = GGUFFile(path)
        try:
            for info in gf.tensors.values():
                _computable(gf, info)
            return gguf_config(gf), Path(path)
        finally:
            gf.close()
    if kind == "compressed-tensors":
        from ..formats.inputs import read_json

        cfg_path = Path(path) / "config.json"
        return config_from_dict(read_json(cfg_path, "config.json"), where=str(cfg_path)), Path(path)
    from ..formats.checkpoint import resolve_model

    ckpt = resolve_model(path)
    try:
        return ckpt.config, ckpt.path
    finally:
        ckpt.close()


def open_artifact(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Artifact:
    kind = artifact_kind(path)
    if kind == "gguf":
        return _open_gguf(Path(path), dtype, device)
    if kind == "compressed-tensors":
        from .ct_artifact import open_ct

        return open_ct(Path(path), dtype, device)
    from ..formats.checkpoint import resolve_model
    from ..model.loading import load_model
    from ..formats.tokenizer import load_tokenizer

    ckpt = resolve_model(path)
    model = load_model(ckpt, dtype, device)
    files = sorted(p for p in ckpt.path.iterdir() if p.suffix == ".safetensors")
    linears = [(f"model.layers.{i}.{k}.weight", shape) for i in range(ckpt.config.num_hidden_layers)
               for k, shape in ckpt.config.linear_shapes(i).items()]
    n = sum(math.prod(s) for _, s in linears)
    nbytes = sum(ckpt.raw_bytes(name).nbytes for name, _ in linears)
    fmt = str(ckpt.dtype("model.layers.0.mlp.up_proj.weight")).replace("torch.", "")
    return Artifact(model, load_tokenizer(ckpt.path, rows=ckpt.config.vocab_size), "hf", ckpt.path, ckpt.name, files,
                    {fmt: len(linears)}, n, nbytes)


# -- GGUF -----------------------------------------------------------------------------------------
def _u(gf: GGUFFile, key: str, default=None):
    v = gf.get(key, default)
    if v is None:
        raise GemmaQuantError(f"{gf.path}: metadata key '{key}' is missing")
    return v


def gguf_config(gf: GGUFFile) -> GemmaConfig:
    arch = gf.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise GemmaQuantError(f"{gf.path}: GGUF architecture {arch!r} is not a Gemma text model "
                              f"(allowed: {', '.join(GGUF_ARCHS)})")
    a = arch
    mt = GGUF_ARCHS[arch]
    n_layers = int(_u(gf, f"{a}.block_count"))
    hidden = int(_u(gf, f"{a}.embedding_length"))
    heads = int(_u(gf, f"{a}.attention.head_count"))
    head_dim = int(gf.get(f"{a}.attention.key_length", hidden // heads))
    if "token_embd.weight" not in gf.tensors:
        raise GemmaQuantError(f"{gf.path}: tensor 'token_embd.weight' is missing")
    vocab = gf.tensors["token_embd.weight"].shape[0]
    if arch == "gemma4":
        from .gemma4_gguf import gemma4_config

        return gemma4_config(gf, vocab)
    theta = float(gf.get(f"{a}.rope.freq_base", 10000.0))
    d = dict(
        model_type=mt, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layers,
        intermediate_size=int(_u(gf, f"{a}.feed_forward_length")), num_attention_heads=heads,
        num_key_value_heads=int(gf.get(f"{a}.attention.head_count_kv", heads)), head_dim=head_dim,
        rms_norm_eps=float(gf.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(gf.get(f"{a}.context_length", 8192)), rope_theta=theta,
        bos_token_id=gf.get("tokenizer.ggml.bos_token_id"), eos_token_id=gf.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=gf.get("tokenizer.ggml.padding_token_id"),
    )
    if arch == "gemma":
        d["layer_types"] = [FULL] * n_layers
        return config_from_dict(d, where=str(gf.path))
    big = (arch == "gemma2" and n_layers == 46) or (arch == "gemma3" and n_layers == 62)
    d["query_pre_attn_scalar"] = hidden // heads if big else head_dim
    d["attn_logit_softcapping"] = gf.get(f"{a}.attn_logit_softcapping")
    d["final_logit_softcapping"] = gf.get(f"{a}.final_logit_softcapping")
    window = gf.get(f"{a}.attention.sliding_window", 4096 if arch == "gemma2" else None)
    pattern = gf.get(f"{a}.attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if hasattr(pattern, "__len__"):  # per-layer flags (true = sliding)
        sliding = [bool(x) for x in pattern][:n_layers]
    else:  # llama.cpp set_swa_pattern: layer il slides iff il % n < n - 1
        sliding = [int(pattern) == 0 or il % int(pattern) < int(pattern) - 1 for il in range(n_layers)]
    if not window:
        sliding = [False] * n_layers
    d["sliding_window"] = int(window) if window else None
    d["layer_types"] = [SLIDING if s else FULL for s in sliding]
    d["rope_local_base_freq"] = float(gf.get(f"{a}.rope.freq_base_swa", 10000.0 if arch == "gemma3" else theta))
    if gf.get(f"{a}.rope.scaling.type") == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": float(_u(gf, f"{a}.rope.scaling.factor"))}
    return config_from_dict(d, where=str(gf.path))


def _computable(gf: GGUFFile, info) -> GGMLType:
    """The tensor's type as one gemmaquant computes with (the reader accepts every type the gguf
    package knows; the forward pass runs only the ones in GGMLType)."""
    try:
        return GGMLType(int(info.qtype))
    except ValueError:
        allowed = ", ".join(t.name for t in GGMLType)
        raise GemmaQuantError(f"{gf.path}: tensor '{info.name}' is {info.type_name}, a GGML type gemmaquant does not "
                              f"compute with (supported: {allowed})") from None


def _first_bad_block(raw: torch.Tensor, qtype: GGMLType) -> int | None:
    """Byte offset (within the tensor) of the first block whose fp16 scale/min (or float value) is
    NaN/Inf, else None. Only the scale fields are read: codes are always finite."""
    flat = raw.reshape(-1)
    if qtype == GGMLType.F32:
        bad = ~torch.isfinite(flat.view(torch.float32))
        unit = 4
    elif qtype in (GGMLType.F16, GGMLType.BF16):
        bad = ~torch.isfinite(flat.view(torch.float16 if qtype == GGMLType.F16 else torch.bfloat16))
        unit = 2
    else:
        _, unit = BLOCK[qtype]
        blocks = flat.view(-1, unit)
        fields = F16_FIELDS[qtype]
        bad = torch.zeros(blocks.shape[0], dtype=torch.bool)
        for f in fields:
            half = blocks[:, f:f + 2].contiguous().view(torch.int16).view(-1)
            bad |= (half & 0x7C00) == 0x7C00  # fp16 exponent all ones: Inf or NaN
    idx = torch.nonzero(bad)
    return None if idx.numel() == 0 else int(idx[0, 0]) * unit


def _open_gguf(path: Path, dtype: torch.dtype, device: str) -> Artifact:
    from ..formats.gguf.names import hf_name

    gf = GGUFFile(path)
    cfg = gguf_config(gf)
    expected = cfg.expected_shapes()
    optional = cfg.optional_shapes()  # Gemma 4 K/V of KV-shared layers: loaded by llama.cpp, never read
    tensors: dict[str, str] = {}  # HF name -> GGUF name
    qtypes = {name: _computable(gf, info) for name, info in gf.tensors.items()}
    for name, info in gf.tensors.items():
        if name == "rope_freqs.weight" and cfg.generation == 4:
            continue  # read into the config (gemma4_gguf)
        try:
            hf = hf_name(name, cfg.generation)
        except GemmaQuantError:
            raise GemmaQuantError(f"{path}: unexpected tensor '{name}' for a {gf.get('general.architecture')} "
                                  "model") from None
        if hf in optional and tuple(info.shape) == optional[hf]:
            continue
        want = expected.get(hf, (cfg.vocab_size, cfg.hidden_size) if hf == "lm_head.weight" else None)
        if want is None or tuple(info.shape) != tuple(want):
            raise GemmaQuantError(f"{path}: tensor '{name}' has shape {list(info.shape)}, the metadata "
                                  f"implies {list(want)}")
        bad = _first_bad_block(gf.raw(name), qtypes[name])
        if bad is not None:
            raise GemmaQuantError(f"{path}: tensor '{name}' has a NaN/Inf scale in the {info.type_name} block "
                                  f"at byte offset {info.offset + bad} (corrupt)")
        tensors[hf] = name
    for hf in expected:
        if hf not in tensors:
            raise GemmaQuantError(f"{path}: tensor for '{hf}' is missing")

    def qlin(hf: str) -> QuantLinear:  # 3-D experts: all experts' rows, [E·rows, n]
        info, qtype = gf.tensors[tensors[hf]], qtypes[tensors[hf]]
        raw = gf.raw(tensors[hf])
        if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
            return DenseLinear(raw.view({GGMLType.F32: torch.float32, GGMLType.F16: torch.float16,
                                         GGMLType.BF16: torch.bfloat16}[qtype]))
        return GGMLLinear(raw, qtype, math.prod(info.shape[:-1]), info.shape[-1])

    def norm(hf: str) -> torch.Tensor:  # Gemma 1-3: stored as HF value + 1; F32 per the converter
        qtype = qtypes[tensors[hf]]
        if qtype not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
            raise GemmaQuantError(f"{path}: norm tensor '{tensors[hf]}' is {qtype.name} (expected F32)")
        return qlin(hf).weight.reshape(-1).float() - (1.0 if cfg.norm_unit_offset else 0.0)

    model = assemble(cfg, dtype, qlin, norm)
    if "lm_head.weight" in tensors:
        model.lm_head = QuantEmbedding(qlin("lm_head.weight"))
    formats, n, nbytes = linear_stats(model)
    return Artifact(model.to(device), _gguf_tokenizer(gf), "gguf", path, path.name, [path], formats, n, nbytes)


def _gguf_tokenizer(gf: GGUFFile):
    """Tokenizer from the GGUF's SentencePiece arrays (tokenizer.ggml.*), from the BPE tokens and merges
    of a Gemma 3 converted from tokenizer.json alone (gpt2), or from Gemma 4's BPE (gemma4)."""
    model = gf.get("tokenizer.ggml.model")
    if model not in ("llama", "gpt2", "gemma4"):
        raise GemmaQuantError(f"{gf.path}: tokenizer.ggml.model {model!r} is not supported (allowed: llama, "
                              "the SentencePiece vocabulary Gemma 1-3 use; gpt2, Gemma 3's from tokenizer.json; "
                              "gemma4, Gemma 4's BPE)")
    from tokenizers import Tokenizer as HFTokenizer

    from ..formats.tokenizer import Tokenizer, check_vocab_rows
    from ..formats.tokenizer_json import gemma4_tokenizer_json_text, gpt2_tokenizer_json_text, tokenizer_json_text

    if model == "gpt2":
        tokens, types, merges = (gf.get(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges"))
        if tokens is None or types is None or merges is None or len(tokens) != len(types):
            raise GemmaQuantError(f"{gf.path}: tokenizer.ggml.tokens/token_type/merges are missing or differ in "
                                  "length")
        check_vocab_rows(len(tokens), gf.tensors["token_embd.weight"].shape[0], gf.path)
        bos = gf.get("tokenizer.ggml.bos_token_id")
        eos = gf.get("tokenizer.ggml.eos_token_id")
        backend = HFTokenizer.from_str(gpt2_tokenizer_json_text(list(tokens), types.tolist(), list(merges),
                                                               gf.get("tokenizer.ggml.unknown_token_id")))
        # llama.cpp always adds BOS for this pre-tokenizer (llama-vocab.cpp)
        return Tokenizer(backend, bos_id=bos, eos_ids=[] if eos is None else [int(eos)], add_bos=True,
                         source=gf.path)

    tokens, scores, types = (gf.get(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    if tokens is None or scores is None or types is None or not len(tokens) == len(scores) == len(types):
        raise GemmaQuantError(f"{gf.path}: tokenizer.ggml.tokens/scores/token_type are missing or differ in length")
    check_vocab_rows(len(tokens), gf.tensors["token_embd.weight"].shape[0], gf.path)
    pieces = list(zip(tokens, scores.tolist(), types.tolist()))
    bos, eos, unk = (gf.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown"))
    if model == "gemma4":
        merges = gf.get("tokenizer.ggml.merges")
        if merges is None:
            raise GemmaQuantError(f"{gf.path}: metadata key 'tokenizer.ggml.merges' is missing (a gemma4 BPE vocabulary)")
        text = gemma4_tokenizer_json_text(list(tokens), types.tolist(), list(merges),
                                          unk_id=unk if unk is not None else 3)
    else:
        text = tokenizer_json_text(pieces, unk_id=unk if unk is not None else 3, bos_id=bos if bos is not None else 2,
                                   add_bos=False)
    backend = HFTokenizer.from_str(text)
    backend.post_processor = None  # Tokenizer.encode adds BOS itself
    return Tokenizer(backend, bos_id=bos, eos_ids=[] if eos is None else [int(eos)],
                     add_bos=bool(gf.get("tokenizer.ggml.add_bos_token", True)), source=gf.path)
