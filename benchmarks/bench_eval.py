"""Eval on the demo model: speed of our forward pass vs transformers vs llama.cpp, and perplexity agreement.

    python benchmarks/bench_eval.py [--chunks 6] [--threads 2] [--ppl-chunks 0]
    python benchmarks/bench_eval.py --artifacts demo A.gguf CT_DIR ... [--chunks 4] [--rounds 2] [--compile]

Speed: the same chunks of ctx 512 of the shipped evaluation text (gemmaquant/formats/texts/default_eval.txt), the same thread count, each engine
computing logits for the second half of each chunk only (llama-perplexity's work); tokens/s counts
processed tokens (ctx per chunk, like llama.cpp's prompt-eval rate), median over chunks.
--artifacts: `gemmaquant eval MODEL --json -` for each model in its own process, in --rounds rounds
(models alternate, so load changes hit all alike): median s/chunk per model over all its chunks, the
ratio to the first model (the bf16 `demo`), ppl, and peak RSS of the process (os.wait4's ru_maxrss).
--compile adds a run of each GGUF with `eval --compile`; its time includes compiling each type on first
use (or loading inductor's on-disk cache, from the second process on).
Perplexity: ours (bf16 weights, bf16 and float32 compute) vs llama.cpp on a bf16 GGUF of the same
weights (written by gemmaquant, byte-identical to convert_hf_to_gguf.py --outtype bf16), full text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_ppl import LlamaCpp  # noqa: E402

from gemmaquant.formats.checkpoint import resolve_model  # noqa: E402
from gemmaquant.model.loading import load_model  # noqa: E402
from gemmaquant.formats.inputs import read_text  # noqa: E402
from gemmaquant.evaluate.perplexity import chunk_tokens, perplexity  # noqa: E402
from gemmaquant.formats.texts import builtin_eval_path  # noqa: E402
from gemmaquant.formats.tokenizer import load_tokenizer  # noqa: E402

TEXT = builtin_eval_path()  # the bytes of the development dev-eval.txt (same sha256)


def timed(fn, chunks, first):
    times = []
    with torch.inference_mode():
        fn(chunks[:1, :64], 32)  # warm-up
        for c in chunks:
            t0 = time.perf_counter()
            fn(c[None], first)
            times.append(time.perf_counter() - t0)
    return times


COMPILED = " (compiled)"


def eval_run(model: str, a) -> dict:
    """One `gemmaquant eval` in a child process: its JSON result plus the child's peak RSS in MiB.
    A model named "X (compiled)" runs X with --compile."""
    extra = ["--compile"] if model.endswith(COMPILED) else []
    model = model.removesuffix(COMPILED)
    cmd = [sys.executable, "-m", "gemmaquant.cli", "eval", model, "--text", str(TEXT), "--ctx", str(a.ctx),
           "--chunks", str(a.chunks), "--threads", str(a.threads), "--json", "-", "-q", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
    res = json.loads(stdout)
    res["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return res


def bench_artifacts(a) -> None:
    if a.compile:  # each GGUF also with the torch.compile dequantizers
        a.artifacts = [x for m in a.artifacts for x in ([m, m + COMPILED] if m.endswith(".gguf") else [m])]
    runs: dict[str, list[dict]] = {m: [] for m in a.artifacts}
    for _ in range(a.rounds):
        for m in a.artifacts:
            runs[m].append(eval_run(m, a))
    spc = {m: statistics.median(r["seconds"] / r["chunks"] for r in rs) for m, rs in runs.items()}
    base = spc[a.artifacts[0]]
    print(f"\n### Eval of quantized artifacts, demo model, ctx {a.ctx}, {a.chunks} chunks x {a.rounds} rounds, "
          f"{a.threads} threads\n")
    print("| model | s/chunk (median) | tokens/s | vs first | ppl | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, rs in runs.items():
        r = rs[-1]
        print(f"| {m} | {spc[m]:.2f} | {a.ctx / spc[m]:.0f} | {spc[m] / base:.2f}x | {r['ppl']:.4f} "
              f"| {max(x['peak_rss_mib'] for x in rs):.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", nargs="+", default=None,
                    help="time `gemmaquant eval` on these models (the first is the baseline) and stop")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", action="store_true",
                    help="with --artifacts: also run each GGUF with `eval --compile` (listed as 'X (compiled)')")
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--ppl-chunks", type=int, default=0, help="chunks for the ppl comparison (0 = all)")
    ap.add_argument("--gguf", type=Path, default=None, help="bf16 GGUF of the demo (default: write one)")
    ap.add_argument("--no-ppl", action="store_true", help="speed table only")
    ap.add_argument("--ppl-dtypes", default="float32,bfloat16", help="our compute dtypes for the ppl table")
    a = ap.parse_args()
    if a.artifacts:
        return bench_artifacts(a)
    torch.set_num_threads(a.threads)
    ckpt = resolve_model("demo")
    tok = load_tokenizer(ckpt.path)
    text = read_text(TEXT)
    ids = chunk_tokens(tok.encode(text, add_bos=True), a.ctx, tok.bos_id, a.chunks)
    first = a.ctx // 2
    rows = []

    def row(name, times):
        med = statistics.median(times)
        rows.append((name, a.ctx / med, med))

    for dtype in (torch.float32, torch.bfloat16):
        m = load_model(ckpt, dtype)
        row(f"gemmaquant ({str(dtype)[6:]})", timed(lambda x, f, m=m: m(x, logits_from=f), ids, first))
        del m

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
    row("transformers 5.23 (float32, sdpa)",
        timed(lambda x, f, hf=hf: hf(x, logits_to_keep=x.shape[1] - f).logits, ids, first))
    del hf

    tmp = tempfile.TemporaryDirectory()
    gguf_path = a.gguf
    if gguf_path is None:
        from gemmaquant.export.gguf.writer import write_gguf

        gguf_path = Path(tmp.name) / "demo.BF16.gguf"
        write_gguf(ckpt, "bf16", gguf_path)
    lc = LlamaCpp(str(gguf_path), n_ctx=a.ctx, n_threads=a.threads)
    lc.chunk_logits(ids[0, :64].tolist(), 32)
    times = []
    for c in ids:
        t0 = time.perf_counter()
        lc.chunk_logits(c.tolist(), first)
        times.append(time.perf_counter() - t0)
    row("llama.cpp (bf16 GGUF, llama-cpp-python 0.3.36)", times)

    base = next(r for r in rows if r[0].startswith("transformers"))[1]
    print(f"\n### Eval speed, demo model (Gemma 3 270M), ctx {a.ctx}, {a.chunks} chunks, {a.threads} threads\n")
    print("| engine | tokens/s (median) | s/chunk | vs transformers |")
    print("|---|---:|---:|---:|")
    for name, tps, med in rows:
        print(f"| {name} | {tps:.0f} | {med:.2f} | {tps / base:.2f}x |")

    if a.no_ppl:
        lc.close()
        return
    # perplexity agreement, full text (or --ppl-chunks)
    n = a.ppl_chunks or None
    lres = lc.perplexity(text, a.ctx, n)
    ours_tokens = tok.encode(text, add_bos=True)
    same_tokens = ours_tokens == lres["tokens"]
    all_ids = chunk_tokens(ours_tokens, a.ctx, tok.bos_id, n)
    print(f"\n### Perplexity, demo model, default_eval.txt, ctx {a.ctx}, {len(all_ids)} chunks\n")
    print(f"tokenization identical to llama.cpp's: {same_tokens} ({len(ours_tokens)} tokens)\n")
    print("| engine | ppl | ± | vs llama.cpp |")
    print("|---|---:|---:|---:|")
    print(f"| llama.cpp bf16 GGUF | {lres['ppl']:.4f} | {lres['ppl_stderr']:.4f} | — |")
    for dtype in (getattr(torch, d) for d in a.ppl_dtypes.split(",")):
        m = load_model(ckpt, dtype)
        r = perplexity(lambda x, f, m=m: m(x, logits_from=f), all_ids)
        print(f"| gemmaquant {str(dtype)[6:]} compute | {r.ppl:.4f} | {r.ppl_stderr:.4f} | "
              f"{100 * (r.ppl / lres['ppl'] - 1):+.3f}% |")
        del m
    lc.close()


if __name__ == "__main__":
    main()
