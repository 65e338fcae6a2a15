"""vLLM (CPU) on gemmaquant's compressed-tensors outputs of tiny Gemma 4 checkpoints: a dense 31B-like, an
E2B-like (per-layer inputs, KV sharing) and a 26B-A4B-like mixture of experts (per-expert Linears): vLLM's
log-probabilities of the prompt tokens and its greedy tokens beside our own forward pass on the same output.
RESULTS.md §10.

    python benchmarks/bench_gemma4_vllm.py --vllm /path/to/vllm-venv/bin/python [--schemes fp8,w4a16]
        [--variants dense-256,e2b-256,moe-256]

fp8-static (static input scales) is calibrated on 8 × 64 tokens of the built-in calibration text; every
other scheme is round-to-nearest.

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

PROMPT = [2, 17, 99, 150, 200, 31, 77, 140, 5, 250, 63, 118, 9, 201, 44, 180]
NEW = 4
CHILD = f"""
import json, sys, time
t = time.time()
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype=sys.argv[2], max_model_len=256, enforce_eager=True)
out = llm.generate([{{"prompt_token_ids": {PROMPT}}}], SamplingParams(max_tokens={NEW}, temperature=0, prompt_logprobs=0))
lp = [d[tok].logprob for d, tok in zip(out[0].prompt_logprobs[1:], {PROMPT}[1:])]
print("RESULT " + json.dumps({{"tokens": list(out[0].outputs[0].token_ids), "prompt_logprobs": lp,
                              "seconds": round(time.time() - t, 1)}}))
"""


def ours(out: Path) -> tuple[list[int], list[float]]:
    """Greedy tokens and the prompt tokens' log-probabilities from our forward pass on the output (dequantized
    weights, vLLM's activation rounding)."""
    from gemmaquant.evaluate.artifact import open_artifact

    model = open_artifact(str(out), torch.float32).model
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids)[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0].tolist()
        for _ in range(NEW):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(PROMPT):].tolist(), lp


def run_vllm(python: str, out: Path, log: Path, dtype: str, mine: tuple[list[int], list[float]] | None) -> str:
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
        said = f"generates {d['tokens']} ({d['seconds']} s with the import)"
        if mine is not None:
            dlp = max(abs(x - y) for x, y in zip(d["prompt_logprobs"], mine[1]))
            said += f"; prompt log-probs max |Δ| vs ours {dlp:.1e}"
        return said
    errs = [line for line in r.stderr.splitlines() if "Error" in line or "error" in line]
    return "fails: " + (errs[-1] if errs else (r.stderr.strip().splitlines() or ["?"])[-1]).strip()[:200]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm", required=True, help="a Python with vLLM installed")
    ap.add_argument("--schemes", default="fp8", help="comma-separated schemes (default fp8; fp8-static is calibrated)")
    ap.add_argument("--variants", default="dense-256,e2b-256,moe-256", help="tiny checkpoints (tests/tiny_gemma4.py)")
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
        names = {"dense-256": "dense 31B-like", "e2b-256": "E2B-like (per-layer inputs, KV sharing)",
                 "moe-256": "MoE 26B-A4B-like (16 experts, top 4)",
                 "e2b-256-mm": "E2B-like in Gemma4ForConditionalGeneration"}
        for variant in a.variants.split(","):
            what = names.get(variant, variant)
            src = root / variant
            if not src.is_dir():
                make_tiny_gemma4(variant, src, dtype=torch.bfloat16)
            mine = ours(src)  # our forward on the source itself: the unquantized comparison
            rows.append((what, "bf16 source", run_vllm(a.vllm, src, root / f"{variant}.log", a.dtype, mine), str(mine[0])))
            for s in a.schemes.split(","):
                out = root / f"{variant}-{s}"
                shutil.rmtree(out, ignore_errors=True)
                sch = get_scheme(s)
                static = sch.input_activations is not None and not sch.input_activations.dynamic
                run_quantize(Checkpoint(src), sch, out, QuantizeOptions(algorithm=None if static else "rtn",
                                                                        calib_samples=8, calib_len=64))
                mine = ours(out)
                rows.append((what, s, run_vllm(a.vllm, out, root / f"{variant}-{s}.log", a.dtype, mine), str(mine[0])))
                print(rows[-1], flush=True)
        print(f"\n| model | output | vLLM (CPU, {a.dtype}) on a {len(PROMPT)}-token prompt: greedy {NEW} tokens; "
              "prompt log-probs vs ours | ours on the same output |")
        print("|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
