"""Reliability suite (issue 8): bad input, interrupts, determinism, fuzz regressions.

Shared helpers: a tiny-but-real Gemma 3 checkpoint (hidden 256, so K-quants apply to every Linear)
that carries the demo model's real tokenizer files, and `run_cli`, which runs `gemmaquant.cli.app.main`
exactly as the console script does (same argument parsing, same error handling and exit codes) but in
this process, so the suite pays torch's import once instead of once per case.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# hidden 256: every Linear row (K = 256 or 512) is a multiple of the K-quant block of 256.
TINY_G3 = {"model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
           "sliding_window": 16, "sliding_window_pattern": 2, "query_pre_attn_scalar": 128,
           "rope_theta": 1e6, "rope_local_base_freq": 1e4, "max_position_embeddings": 2048,
           "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16"}
_CHARS = "\u2581etaoinshrdlucmfwypvbgkjqxzETAOINSHRDLUCMFWYPVBGKJQXZ0123456789.,;:!?'\"-()\n"
_BIGRAM_CHARS = "\u2581etaoinshrdlucm"


def tiny_tokenizer_model(vocab_size: int = 512) -> bytes:
    """A BPE tokenizer.model laid out like Gemma's (0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, byte fallback)
    with `vocab_size` pieces, so every id it produces fits a tiny embedding. Parsing Gemma's real
    262k-piece model costs ~4 s per run on this machine; this one costs milliseconds."""
    from gemmaquant.formats.spm_proto import BYTE, CONTROL, NORMAL, UNKNOWN, encode_model_proto

    pieces = [("<pad>", 0.0, CONTROL), ("<eos>", 0.0, CONTROL), ("<bos>", 0.0, CONTROL), ("<unk>", 0.0, UNKNOWN)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    words = list(dict.fromkeys(_CHARS)) + [a + b for a in _BIGRAM_CHARS for b in _BIGRAM_CHARS if b != "\u2581"]
    words = words[:vocab_size - len(pieces)]
    pieces += [(w, -float(i), NORMAL) for i, w in enumerate(words)]
    assert len(pieces) == vocab_size, len(pieces)
    return encode_model_proto(pieces, unk_id=3, bos_id=2, eos_id=1, pad_id=0, unk_piece="<unk>",
                              bos_piece="<bos>", eos_piece="<eos>", pad_piece="<pad>")


def write_tiny(d: Path, cfg: dict | None = None, *, seed: int = 0, tokenizer: bool = True,
               dtype=torch.bfloat16, tensors: dict | None = None) -> dict[str, torch.Tensor]:
    """A random Gemma checkpoint at `d` (config.json + model.safetensors [+ the demo's tokenizer])."""
    from safetensors.torch import save_file

    from gemmaquant.formats.config import config_from_dict

    cfg = dict(TINY_G3 if cfg is None else cfg)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    if tensors is None:
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for n, s in config_from_dict(cfg).expected_shapes().items():
            scale = 0.3 if len(s) == 1 else 0.05
            tensors[n] = (torch.randn(s, generator=g) * scale).to(dtype)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        (d / "tokenizer.model").write_bytes(tiny_tokenizer_model(cfg["vocab_size"]))
    return tensors


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(args: list[str], capsys) -> CliResult:
    """`gemmaquant ARGS` through the console script's entry point; a traceback fails the test."""
    import signal

    from gemmaquant.cli.app import main

    old_argv, old_term, old_hup = sys.argv, signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    # `--threads N` sets torch's process-wide thread count: restored, or a later test in this process
    # computes with N threads (outside the calibration passes torch's float ops differ by thread count)
    import torch

    old_threads = torch.get_num_threads()
    sys.argv = ["gemmaquant", *map(str, args)]
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)
        torch.set_num_threads(old_threads)
    cap = capsys.readouterr()
    return CliResult(code, cap.out, cap.err)


def tree(d: Path) -> list[str]:
    """Every path under `d` (relative), hidden temporaries included."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def check_error(res: CliResult, code: int, match: str) -> str:
    """The run failed as a user error must: exit `code`, exactly one `error:` line on stderr that
    contains `match`, no traceback anywhere. Returns the line."""
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.code == code, (res.code, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def digests(*paths: Path) -> dict[str, str]:
    """sha256 of every regular file at or under `paths` (inputs must come out of a run unchanged)."""
    import hashlib

    out = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def forbid_weight_loading(monkeypatch) -> None:
    """Make loading any weights fail the test: for refusals that must come before the model loads.
    The modules are imported first, so the patch never leaks into a name bound at import time."""
    import pytest

    import gemmaquant.evaluate.artifact
    import gemmaquant.evaluate.eval_model
    import gemmaquant.model.loading

    def loaded(*a, **k):
        pytest.fail("weights were loaded before the refusal")
    for mod, name in ((gemmaquant.model.loading, "load_model"), (gemmaquant.evaluate.eval_model, "load_model"),
                      (gemmaquant.evaluate.artifact, "open_artifact")):
        monkeypatch.setattr(mod, name, loaded)
