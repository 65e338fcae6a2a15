"""Size budgets on Gemma 4 (RESULTS.md §10): per layout (the tiny checkpoints of tests/tiny_gemma4.py, saved
by transformers), a `--target-size` file at 92 % of llama.cpp's q4_k_m size beside that q4_k_m, judged by
llama.cpp; and the sensitivity pass's estimates against the true KL of quantizing each tensor alone.

    python benchmarks/gemma4_budget.py [--layouts dense,moe] [--samples 2] [--len 32]

Files: bytes, llama.cpp's BPW, and llama.cpp's mean KL from the bf16 file (our writer,
itself byte-identical to convert_hf_to_gguf.py) over 2 × 48 random tokens. Estimates: for every tensor
the budget chooses, the estimated ΔKL at Q4_0 against our forward pass with that tensor alone at Q4_0
(the same importance the pass used), over the same 3 × 24 tokens (last 8 positions): the median and range
of est/true, and the rank correlation. Needs the test dependencies (transformers, llama-cpp-python).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemmaquant.calib.sensitivity import REFERENCE, measure_sensitivity  # noqa: E402
from gemmaquant.formats.checkpoint import Checkpoint  # noqa: E402
from gemmaquant.export.gguf.writer import write_gguf  # noqa: E402
from gemmaquant.model.loading import load_model  # noqa: E402
from tests.tiny_gemma4 import make_tiny_gemma4  # noqa: E402
from tests.export.gguf.test_optimized_gemma4 import at_reference, float_inputs, true_kl  # noqa: E402

LAYOUTS = ("dense", "dense-kv", "e2b-p32", "moe", "e2b-mm")


def _cli(args: list[str]) -> dict:
    import subprocess

    r = subprocess.run([sys.executable, "-m", "gemmaquant.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout)


def _llama_logits(path: Path, seqs: list[list[int]]):
    import llama_cpp

    from tests.llamacpp import open_llama

    llm = open_llama(path, n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    out = []
    for s in seqs:
        llm.reset()
        llm.eval(s)
        out.append(np.asarray(llm.scores[: len(s)], dtype=np.float64))
    return np.concatenate(out), llama_cpp.llama_model_size(llm.model), llama_cpp.llama_model_n_params(llm.model)


def _kl(a: np.ndarray, b: np.ndarray) -> float:
    la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    return float((np.exp(la) * (la - lb)).sum(-1).mean())


def files(kind: str, root: Path, samples: int, length: int) -> str:
    src = root / f"{kind}-bf16"
    make_tiny_gemma4(kind, src, dtype=torch.bfloat16)
    ref_file = write_gguf(Checkpoint(src), "bf16", root / f"{kind}-bf16.gguf").path  # lossless: a bf16 source
    plain = _cli(["quantize", src, "--scheme", "q4_k_m", "-o", root / f"{kind}-q4km.gguf", "--json", "--quiet"])
    target = plain["output_bytes"] * 92 // 100
    t0 = time.perf_counter()
    budget = _cli(["quantize", src, "--scheme", "q4_k_m", "-o", root / f"{kind}-budget.gguf", "--json", "--quiet",
                   "--threads", 1, "--calib-samples", samples, "--calib-len", length, "--target-size", target])
    secs = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    seqs = [[2, *rng.integers(5, 260, 47).tolist()] for _ in range(2)]
    ref, _, _ = _llama_logits(ref_file, seqs)
    row = [kind]
    for p, s in ((root / f"{kind}-q4km.gguf", plain), (root / f"{kind}-budget.gguf", budget)):
        logits, size, n = _llama_logits(p, seqs)
        row += [f"{s['output_bytes']:,}", f"{8 * size / n:.3f}", f"{_kl(ref, logits):.4f}"]
    types = sorted(t for t in budget["tensor_types"] if t != "F32")
    return "| " + " | ".join(row + [f"{target:,}", ", ".join(types), f"{secs:.0f}"]) + " |"


def estimates(kind: str, root: Path) -> str:
    src = root / f"{kind}-f32"
    make_tiny_gemma4(kind, src)
    ck = Checkpoint(src)
    ids = torch.randint(5, 260, (3, 24), generator=torch.Generator().manual_seed(0))
    rep = measure_sensitivity(ck, ids, kl_positions=8, batch_size=2)
    model = load_model(ck)
    inputs, routed = float_inputs(model, ids)
    rows = []
    for name, s in rep.tensors.items():
        if name == "token_embd.weight":  # two roles (input and tied head): no single-tensor reference
            continue
        p, value = at_reference(model, name, inputs, routed)
        rows.append((name, s.kl[REFERENCE], true_kl(model, ids, p, value, 8), s.detail))
    est = np.array([r[1] for r in rows])
    true = np.array([r[2] for r in rows])
    ratio = est / true
    own = [abs(r[1] / r[2] - 1) for r in rows if "own gain" in r[3] or "per-layer input" in r[3]]
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    rho = np.corrcoef(rank(est), rank(true))[0, 1]
    exp = [r for r in rows if "_exps" in r[0]]
    exps = f"{min(r[1] / r[2] for r in exp):.2f}-{max(r[1] / r[2] for r in exp):.2f}" if exp else "-"
    return (f"| {kind} | {len(rows)} | {np.median(ratio):.2f} | {ratio.min():.2f}-{ratio.max():.2f} | {rho:.2f} | "
            f"{exps} | {len(own)} | {max(own):.1e} |" if own else
            f"| {kind} | {len(rows)} | {np.median(ratio):.2f} | {ratio.min():.2f}-{ratio.max():.2f} | {rho:.2f} | "
            f"{exps} | 0 | - |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--len", type=int, default=32)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    kinds = a.layouts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("| layout | q4_k_m bytes | BPW | KL | budget bytes | BPW | KL | target | budget's types | s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
        for k in kinds:
            print(files(k, root, a.samples, a.len), flush=True)
        print()
        print("| layout | tensors | est/true median | range | rank corr. | experts est/true | exact streams | "
              "max rel. err |")
        print("| --- | ---: | ---: | --- | ---: | --- | ---: | ---: |")
        for k in kinds:
            print(estimates(k, root), flush=True)


if __name__ == "__main__":
    main()
