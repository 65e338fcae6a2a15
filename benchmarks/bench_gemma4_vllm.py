"""vLLM (CPU) on gemmaquant's compressed-tensors outputs of tiny Gemma 4 checkpoints: a dense 31B-like and a
26B-A4B-like mixture of experts (per-expert Linears), greedy generation of a few tokens beside our own
forward pass on the same output. RESULTS.md §10.

    python benchmarks/bench_gemma4_vllm.py --vllm /path/to/vllm-venv/bin/python [--schemes fp8,w4a16]

vLLM is never a gemmaquant dependency: it runs in its own Python (see benchmarks/vllm_cpu_check.py for
the venv), one child process per output, and whatever it says when it fails is printed as is (its last
error line; the full log beside the table with --keep). The checkpoints are the 256-wide variants of
tests/tiny_gemma4.py (head dims 128/256: vLLM's CPU attention has no kernel for head_dim 16), saved by
transformers in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

PROMPT = [2, 17, 99, 150, 200]
NEW = 4
CHILD = f"""
import json, sys, time
t = time.time()
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype=sys.argv[2], max_model_len=256, enforce_eager=True)
out = llm.generate([{{"prompt_token_ids": {PROMPT}}}], SamplingParams(max_tokens={NEW}, temperature=0))
print("RESULT " + json.dumps({{"tokens": list(out[0].outputs[0].token_ids), "seconds": round(time.time() - t, 1)}}))
"""


def ours(out: Path) -> list[int]:
    """Greedy tokens of our forward pass on the output (dequantized weights, vLLM's activation rounding)."""
    from gemmaquant.evaluate.artifact import open_artifact

    model = open_artifact(str(out), torch.float32).model
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        for _ in range(NEW):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(PROMPT):].tolist()


def run_vllm(python: str, out: Path, log: Path, dtype: str) -> str:
    env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME")}, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    try:
        r = subprocess.run([python, "-c", CHILD, str(out), dtype], capture_output=True, text=True, timeout=1800, env=env)
    except subprocess.TimeoutExpired:
        return "no answer in 30 min"
    log.write_text(r.stdout + r.stderr)
    res = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode == 0 and res:
        d = json.loads(res[-1][7:])
        return f"generates {d['tokens']} ({d['seconds']} s with the import)"
    errs = [line for line in r.stderr.splitlines() if "Error" in line or "error" in line]
    return "fails: " + (errs[-1] if errs else (r.stderr.strip().splitlines() or ["?"])[-1]).strip()[:200]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm", required=True, help="a Python with vLLM installed")
    ap.add_argument("--schemes", default="fp8", help="comma-separated round-to-nearest schemes (default fp8)")
    ap.add_argument("--dtype", default="float32", help="vLLM's dtype (float32; vLLM's CPU WNA16 GEMM needs bfloat16)")
    ap.add_argument("--keep", help="keep the checkpoints, outputs and vLLM logs in this directory")
    a = ap.parse_args()
    from gemmaquant.pipeline import QuantizeOptions, run_quantize
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.schemes import get_scheme
    from tests.tiny_gemma4 import make_tiny_gemma4

    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_g4_vllm_"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for variant, what in (("dense-256", "dense 31B-like"), ("moe-256", "MoE 26B-A4B-like (16 experts, top 4)")):
            src = root / variant
            if not src.is_dir():
                make_tiny_gemma4(variant, src, dtype=torch.bfloat16)
            rows.append((what, "bf16 source", run_vllm(a.vllm, src, root / f"{variant}.log", a.dtype), "n/a"))
            for s in a.schemes.split(","):
                out = root / f"{variant}-{s}"
                shutil.rmtree(out, ignore_errors=True)
                run_quantize(Checkpoint(src), get_scheme(s), out, QuantizeOptions(algorithm="rtn"))
                rows.append((what, s, run_vllm(a.vllm, out, root / f"{variant}-{s}.log", a.dtype), str(ours(out))))
                print(rows[-1], flush=True)
        print(f"\n| model | output | vLLM (CPU, {a.dtype}), greedy {NEW} tokens of {PROMPT} | ours on the same output |")
        print("|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
