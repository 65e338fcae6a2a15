"""Cost of building the demo model and of its tokenizer.

    python benchmarks/bench_demo_build.py [--cache DIR]

Builds the demo checkpoint into a fresh cache directory (a temporary one unless --cache is given) and
reports wall time and this process's peak RSS (targets: < 60 s, <= 1.5 GB on the 2-core machine).
Then times the tokenizer: loading tokenizer.json, loading from tokenizer.model alone (the fallback,
which generates the 515k merges in Python), and encoding the shipped evaluation text (90 kB).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from gemmaquant.formats.demo import ensure_demo_checkpoint
from gemmaquant.formats.texts import builtin_eval_path
from gemmaquant.formats.tokenizer import load_tokenizer

EVAL_TEXT = builtin_eval_path()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="gemmaquant-bench-"))
    try:
        t = time.perf_counter()
        d = ensure_demo_checkpoint(cache)
        print(f"build: {time.perf_counter() - t:.1f} s, peak RSS {peak_rss_mb():.0f} MB -> {d}")

        t = time.perf_counter()
        tok = load_tokenizer(d)
        print(f"load tokenizer.json: {time.perf_counter() - t:.2f} s")
        spm_only = cache / "spm-only"
        spm_only.mkdir(exist_ok=True)
        shutil.copy(d / "tokenizer.model", spm_only / "tokenizer.model")
        t = time.perf_counter()
        load_tokenizer(spm_only)
        print(f"load tokenizer.model (fallback): {time.perf_counter() - t:.2f} s")

        text = EVAL_TEXT.read_text(encoding="utf-8")
        t = time.perf_counter()
        ids = tok.encode(text, parse_special=False)
        dt = time.perf_counter() - t
        print(f"encode the eval text: {len(ids)} tokens in {dt:.2f} s ({len(ids) / dt:,.0f} tokens/s)")
        print(f"peak RSS overall: {peak_rss_mb():.0f} MB")
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
