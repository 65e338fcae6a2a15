"""The reference pipeline our GGUF files must equal: llama.cpp's own converter and quantizer.

* `convert_hf_to_gguf.py` comes from the llama-cpp-python 0.3.36 sdist (the same llama.cpp tree as the
  installed `llama_cpp` library), fetched once with `pip download` and extracted into a cache
  (GEMMAQUANT_LLAMACPP_SRC, else ~/.cache/gemmaquant-tests). It runs in a subprocess with its own
  vendored gguf-py. Tests skip, naming the reason, when it cannot be fetched.
* llama-quantize is `llama_cpp.llama_model_quantize` (libllama). The importance matrix and the
  `quantize.imatrix.*` keys are passed the way tools/quantize/quantize.cpp passes them: an array of
  {name, data, size} and kv overrides (file, dataset, entries_count, chunks_count).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.tier import forbid

SDIST = "llama-cpp-python==0.3.36"
SDIST_DIR = "llama_cpp_python-0.3.36"
_KV_INT, _KV_STR = 0, 3  # LLAMA_KV_OVERRIDE_TYPE_INT / _STR


def _cache() -> Path:
    return Path(os.environ.get("GEMMAQUANT_LLAMACPP_SRC", Path.home() / ".cache" / "gemmaquant-tests"))


def llamacpp_tree() -> Path:
    """The llama.cpp source tree of the sdist (downloaded and extracted on first use), or skip."""
    forbid("llama.cpp's converter", "llamacpp")
    root = _cache()
    tree = root / SDIST_DIR / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    tarballs = list(root.glob("llama_cpp_python-0.3.36.tar.gz"))
    if not tarballs:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            SDIST, "-d", str(root)],
                           capture_output=True, text=True, timeout=600)
        tarballs = list(root.glob("llama_cpp_python-0.3.36.tar.gz"))
        if not tarballs:
            pytest.skip(f"cannot download the {SDIST} sdist for convert_hf_to_gguf.py: "
                        f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    with tarfile.open(tarballs[0]) as tf:
        members = [m for m in tf.getmembers()
                   if m.name.startswith(f"{SDIST_DIR}/vendor/llama.cpp/")
                   and ("/gguf-py/" in m.name or "/conversion/" in m.name
                        or m.name.endswith("/convert_hf_to_gguf.py"))]
        tf.extractall(root, members=members, filter="data")
    return tree


_DRIVER = """
import sys
sys.path.insert(1, sys.argv[1] + "/gguf-py")
sys.path.insert(0, sys.argv[1])
import convert_hf_to_gguf
jobs = sys.argv[2:]
for i in range(0, len(jobs), 3):
    outtype, _, mm = jobs[i + 2].partition("+")
    sys.argv = ["convert_hf_to_gguf.py", jobs[i], "--outfile", jobs[i + 1], "--outtype", outtype]
    if mm:
        sys.argv.append("--mmproj")
    convert_hf_to_gguf.main()
"""


def _digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(model_dir.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def convert_many(jobs: list[tuple[Path, str]]) -> list[Path]:
    """`convert_hf_to_gguf.py model_dir --outtype outtype` for each (model_dir, outtype), in one Python
    process (torch + transformers import once). Outputs are cached by the inputs' content hash.
    An outtype "T+mmproj" runs `--outtype T --mmproj` (the vision tower's clip GGUF)."""
    tree = llamacpp_tree()
    cache = _cache() / "converted"
    cache.mkdir(parents=True, exist_ok=True)
    outs = [cache / f"{Path(d).name}-{_digest(Path(d))}.{t}.gguf" for d, t in jobs]
    todo = [x for (d, t), o in zip(jobs, outs) if not o.is_file() for x in (str(d), str(o) + ".part", t)]
    if todo:
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        r = subprocess.run([sys.executable, "-c", _DRIVER, str(tree), *todo],
                           capture_output=True, text=True, env=env, timeout=1800)
        if r.returncode != 0:
            raise AssertionError(f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}")
        for o in outs:
            if not o.is_file():
                os.replace(str(o) + ".part", o)
    return outs


def convert_mmproj(model_dir: Path, outtype: str = "f16") -> Path:
    """llama.cpp's `convert_hf_to_gguf.py model_dir --mmproj --outtype outtype` (cached)."""
    return convert_many([(model_dir, outtype + "+mmproj")])[0]


def convert(model_dir: Path, outtype: str = "bf16") -> Path:
    """llama.cpp's `convert_hf_to_gguf.py model_dir --outtype outtype` (cached)."""
    return convert_many([(model_dir, outtype)])[0]


def quantize(inp: Path, out: Path, ftype: int, *, imatrix: dict[str, np.ndarray] | None = None,
             meta: dict | None = None, nthread: int = 2) -> Path:
    """llama-quantize through libllama: `llama_model_quantize(inp, out, params)`."""
    forbid("llama.cpp's quantizer", "llamacpp")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    keep = []  # ctypes buffers must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        params.imatrix = entries
        meta = meta or {}
        kvs = []
        if meta.get("file") is not None:
            kvs.append(("quantize.imatrix.file", _KV_STR, meta["file"]))
        if meta.get("dataset"):
            kvs.append(("quantize.imatrix.dataset", _KV_STR, meta["dataset"]))
        kvs.append(("quantize.imatrix.entries_count", _KV_INT, len(imatrix)))
        if meta.get("chunks_count"):
            kvs.append(("quantize.imatrix.chunks_count", _KV_INT, meta["chunks_count"]))
        overrides = (llama_cpp.llama_model_kv_override * (len(kvs) + 1))()
        for o, (key, tag, val) in zip(overrides, kvs):
            o.key, o.tag = key.encode(), tag
            if tag == _KV_STR:
                o.value.val_str = val.encode()[:127]
            else:
                o.value.val_i64 = int(val)
        overrides[len(kvs)].key = b""
        params.kv_overrides = overrides
        keep += [entries, overrides]
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise AssertionError(f"llama_model_quantize({inp}, ftype={ftype}) returned {rc}")
    return out


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> type name, read back with the gguf package."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def kv_and_tensors(path: Path) -> tuple[dict, dict]:
    """({key: (types, raw value bytes)}, {tensor: (type, shape, bytes)}) for order-free comparisons."""
    import gguf

    r = gguf.GGUFReader(path)
    kv = {k: (tuple(int(t) for t in f.types), b"".join(bytes(f.parts[i]) for i in f.data))
          for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), bytes(np.asarray(t.data).view(np.uint8)))
               for t in r.tensors}
    return kv, tensors


# -- tiny random Gemma checkpoints with a small SentencePiece vocabulary ----------------------------
TINY_VOCAB = 320


def tiny_tokenizer(out: Path) -> None:
    """tokenizer.model (320 pieces: 4 specials, 256 bytes, a USER_DEFINED piece, normal pieces) and a
    tokenizer_config.json whose added_tokens_decoder exercises CONTROL / USER_DEFINED typing."""
    import json

    from gemmaquant.formats.spm_proto import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, encode_model_proto

    pieces = [("<pad>", 0.0, CONTROL), ("<eos>", 0.0, CONTROL), ("<bos>", 0.0, CONTROL), ("<unk>", 0.0, UNKNOWN)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    pieces += [("\n\n", 0.0, USER_DEFINED), ("<start_of_turn>", 0.0, USER_DEFINED), ("<end_of_turn>", 0.0, USER_DEFINED)]
    letters = "\u2581abcdefghijklmnopqrstuvwxyz"
    words = [c for c in letters] + [a + b for a in letters[:6] for b in letters[1:6]]
    for i, wd in enumerate(words[: TINY_VOCAB - len(pieces)]):
        pieces.append((wd, -float(i), NORMAL))
    (out / "tokenizer.model").write_bytes(encode_model_proto(
        pieces, unk_id=3, bos_id=2, eos_id=1, pad_id=0,
        unk_piece="<unk>", bos_piece="<bos>", eos_piece="<eos>", pad_piece="<pad>"))
    decoder = {str(i): {"content": p, "special": True} for i, (p, _, _) in enumerate(pieces[:4])}
    decoder["261"] = {"content": "<start_of_turn>", "special": True}
    decoder["262"] = {"content": "<end_of_turn>", "special": True}
    decoder["263"] = {"content": "<unused0>", "special": False}  # looks special -> CONTROL
    decoder["264"] = {"content": "\u2581\u2581", "special": False}  # USER_DEFINED, ▁ -> space
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "added_tokens_decoder": decoder}))


TINY_CONFIGS = {
    # generation -> (config class, model class, kwargs). Row lengths 64/160 force the fallbacks.
    "gemma1": ("GemmaConfig", "GemmaForCausalLM", dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=8, query_pre_attn_scalar=32)),
    # row lengths that are multiples of 256: the K-quants without fallback
    "gemma2-256": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=128, sliding_window=8, query_pre_attn_scalar=128)),
    "gemma3-256": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=128, sliding_window=8, query_pre_attn_scalar=128)),
}


def tiny_checkpoint(kind: str, out: Path, seed: int = 0) -> Path:
    """A random bf16 HF checkpoint named like an HF repo (e.g. tiny-gemma3-2M) with the tiny tokenizer."""
    import torch
    import transformers

    cfg_cls, model_cls, kwargs = TINY_CONFIGS[kind]
    out.mkdir(parents=True, exist_ok=True)
    cfg = getattr(transformers, cfg_cls)(vocab_size=TINY_VOCAB, bos_token_id=2, eos_token_id=1,
                                         pad_token_id=0, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in n else 0.05))
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tiny_tokenizer(out)
    return out


def random_gemma3_256(out: Path, seed: int = 0) -> Path:
    """The "gemma3-256" layout (each preset's own types, no fallback) with random bf16 weights, saved
    without transformers (fast-tier tests), with the tiny tokenizer."""
    import json

    import torch
    from safetensors.torch import save_file

    from gemmaquant.formats.config import config_from_dict

    cfg = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=TINY_VOCAB,
               hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=64, sliding_window=8, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    save_file({k: (torch.randn(s, generator=g) * (0.3 if "norm" in k else 0.05)).to(torch.bfloat16)
               for k, s in config_from_dict(cfg).expected_shapes().items()}, out / "model.safetensors")
    tiny_tokenizer(out)
    return out


def dry_run(inp: Path, ftype: int, *, imatrix: bool = False) -> dict:
    """llama-quantize's type choice without quantizing: `llama_model_quantize` with `dry_run`, its
    per-tensor log parsed. `imatrix`: pass a one-entry importance matrix (has_imatrix is all the rules
    look at). Returns {"types": {tensor: TYPE}, "needs_imatrix": bool, "fallback": int}."""
    forbid("llama.cpp's quantizer", "llamacpp")
    import contextlib
    import io
    import re

    import llama_cpp
    from llama_cpp import _logger

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.dry_run = ftype, 1, True
    keep = np.ones(1, np.float32)
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * 2)()
        entries[0].name = b"not-a-tensor"
        entries[0].data = keep.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[0].size = 1
        entries[1].name = None
        params.imatrix = entries
    log = io.StringIO()
    level = _logger.logger.level
    _logger.set_verbose(True)  # an earlier Llama(verbose=False) silences the INFO lines we parse
    try:
        with contextlib.redirect_stderr(log):
            rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(inp).encode() + b".unused",
                                                ctypes.byref(params))
    finally:
        _logger.logger.setLevel(level)
    text = log.getvalue()
    if rc != 0:
        raise AssertionError(f"llama_model_quantize dry run ({inp}, ftype={ftype}) returned {rc}:\n{text[-2000:]}")
    types = {m.group(1): (m.group(3) or m.group(2)).upper() for m in re.finditer(
        r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\S+), size =\s+[\d.]+ MiB(?: ->\s+[\d.]+ MiB \((\S+)\))?", text)}
    fb = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", text)
    return {"types": types, "needs_imatrix": "will require an imatrix" in text,
            "fallback": int(fb.group(1)) if fb else 0}


def quant_options() -> list[tuple[str, int]]:
    """llama-quantize's preset list (QUANT_OPTIONS in tools/quantize/quantize.cpp of the pinned sdist),
    as (name, ftype number); the numbers from llama-cpp-python's constants (the same llama.h)."""
    import re

    import llama_cpp

    llamacpp_tree()  # makes sure the sdist tarball is there
    with tarfile.open(next(_cache().glob("llama_cpp_python-0.3.36.tar.gz"))) as tf:
        src = tf.extractfile(f"{SDIST_DIR}/vendor/llama.cpp/tools/quantize/quantize.cpp").read().decode()
    table = src.split("QUANT_OPTIONS = {", 1)[1].split("};", 1)[0]
    return [(name, int(getattr(llama_cpp, const)))
            for name, const in re.findall(r'\{\s*"(\w+)",\s*(LLAMA_FTYPE_\w+)', table)]
