"""Every number a command takes, checked before any work starts, with the allowed range in the message.

    check_numbers(ctx=512, chunks=4, threads=2, device="cpu")    # static ranges, before the model
    check_for_model(cfg, ctx=512, calib_len=512, ...)            # ranges the model's config sets,
                                                                  # after config.json, before weights
Why up front: `--ctx 65536` allocated 34 GB before failing, `--calib-samples 10**12` tried 8 TB,
`--chunks 0` silently meant "all", `--device cuda` on a machine without a GPU failed deep inside torch.
"""

from __future__ import annotations

import math
import os
import re

from .errors import GemmaQuantError

# option -> (lowest, highest), integers. Bounds far beyond any useful value, tight enough that the
# value cannot build an absurd structure before the model-dependent checks run.
INT_OPTIONS = {
    "--ctx": (8, 1 << 24),
    "--chunks": (1, 1 << 31),
    "--calib-samples": (1, 1 << 20),
    "--calib-len": (2, 1 << 24),
    "--threads": (1, 1024),
    "--topk": (1, 1 << 24),
    "--layer-chunks": (0, 4096),
}
_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def _int(option: str, v) -> None:
    lo, hi = INT_OPTIONS[option]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        kind = "an even integer" if option == "--ctx" else "an integer"
        raise GemmaQuantError(f"{option} {v}: must be {kind} in {lo}..{hi}")


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and a CUDA device must exist (torch is imported only for cuda)."""
    m = _DEVICE.match(str(device))
    if m is None or (m.group(1) == "cpu" and m.group(2) not in (None, "0")):
        raise GemmaQuantError(f"--device {device!r} is not supported (allowed: cpu, cuda, cuda:N)")
    if m.group(1) == "cuda":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise GemmaQuantError(f"--device {device}: torch sees no CUDA GPU on this machine "
                                  f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        idx = int(m.group(2) or 0)
        if idx >= n:
            raise GemmaQuantError(f"--device {device}: there are {n} CUDA device(s) (allowed: cuda:0..cuda:{n - 1})")


def check_numbers(*, ctx: int | None = None, chunks: int | None = None, calib_samples: int | None = None,
                  calib_len: int | None = None, alpha: float | None = None, threads: int | None = None,
                  topk: int | None = None, layer_chunks: int | None = None, device: str | None = None,
                  dtype: str | None = None) -> None:
    """The static ranges of every numeric option given (None: not given / the default applies)."""
    for option, v in (("--ctx", ctx), ("--chunks", chunks), ("--calib-samples", calib_samples),
                      ("--calib-len", calib_len), ("--threads", threads), ("--topk", topk),
                      ("--layer-chunks", layer_chunks)):
        if v is not None:
            _int(option, v)
    if ctx is not None and ctx % 2:
        raise GemmaQuantError(f"--ctx {ctx}: must be an even number (half of each chunk is context, "
                              "half is scored)")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or not 0 <= alpha <= 1):
        raise GemmaQuantError(f"--alpha {alpha}: must be a number in 0..1 (SmoothQuant migration strength)")
    if dtype is not None:
        check_dtype(dtype)
    if device is not None:
        check_device(device)


# --dtype names (model.loading.resolve_dtype maps them to torch dtypes; "auto" picks per device)
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def check_dtype(name: str) -> None:
    if name != "auto" and name not in DTYPE_NAMES:
        raise GemmaQuantError(f"dtype {name!r} is not supported (allowed: auto, {', '.join(DTYPE_NAMES)})")


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_for_model(cfg, where: str, *, ctx: int | None = None, calib_samples: int | None = None,
                    calib_len: int | None = None, topk: int | None = None) -> None:
    """Ranges set by the model (`cfg`: its GemmaConfig, read from config.json or the GGUF header
    before any weight is loaded). Calibration keeps the hidden states of every sample, twice
    (calib/runner.py): samples x length x hidden x 4 bytes x 2 must fit this machine's memory."""
    limit = cfg.max_position_embeddings
    if ctx is not None and ctx > limit:
        raise GemmaQuantError(f"--ctx {ctx}: {where} has a context of {limit} tokens (allowed: 8..{limit}, even)")
    if calib_len is not None and calib_len > limit:
        raise GemmaQuantError(f"--calib-len {calib_len}: {where} has a context of {limit} tokens "
                              f"(allowed: 2..{limit})")
    if topk is not None and topk > cfg.vocab_size:
        raise GemmaQuantError(f"--topk {topk}: {where} has {cfg.vocab_size} tokens (allowed: 1..{cfg.vocab_size})")
    if calib_samples is not None and calib_len is not None:
        need = calib_samples * calib_len * cfg.hidden_size * 4 * 2
        mem = physical_memory()
        if mem is not None and need > mem:
            fit = max(1, mem // (calib_len * cfg.hidden_size * 8))
            raise GemmaQuantError(
                f"--calib-samples {calib_samples} x --calib-len {calib_len}: calibration would hold {_gb(need)} of "
                f"hidden states for {where} (hidden size {cfg.hidden_size}), more than this machine's "
                f"{_gb(mem)} of memory (allowed here: --calib-samples up to {fit} at this length)")
