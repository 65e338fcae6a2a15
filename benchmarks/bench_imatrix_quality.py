"""KL vs bf16 with and without our importance matrix, per GGUF preset (issue 4 §7), scored by llama.cpp.

    python benchmarks/bench_imatrix_quality.py LLAMA_PERPLEXITY --imatrix IMATRIX.gguf
        [--presets q4_k_m q4_k_s q5_k_m q6_k q4_0] [--text FILE] [--chunks 4] [--dir /tmp/imx]

For each preset: `gemmaquant quantize demo --scheme P` with and without `--imatrix-file IMATRIX`
(our own imatrix, e.g. the one bench_imatrix_agreement.py writes from the built-in calibration text,
which is not the eval text), then llama-perplexity's KL-divergence mode against the bf16 GGUF's logits
(`--kl-divergence-base`, computed once) on the same chunks. Parses mean KLD, "Same top p" and
PPL(Q) − PPL(base) from its log. Files and logs already in --dir are reused (delete them to redo).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

from gemmaquant.formats.texts import builtin_eval_path

PATTERNS = {
    "ppl_q": r"Mean PPL\(Q\)\s*:\s*([\d.]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
    "dppl": r"Mean PPL\(Q\)-PPL\(base\)\s*:\s*(-?[\d.]+)",
    "kl_mean": r"Mean\s+KLD:\s*([\d.]+)\s*±\s*([\d.]+)",
    "top1_pct": r"Same top p:\s*([\d.]+)\s*±\s*([\d.]+)",
}


def parse_kld_log(text: str) -> dict:
    out = {}
    for key, pat in PATTERNS.items():
        m = re.search(pat, text)
        if m is None:
            raise ValueError(f"no {key} in llama-perplexity output")
        out[key] = float(m.group(1))
        if m.lastindex == 2:
            out[key + "_pm"] = float(m.group(2))
    return out


def run(cmd: list[str], log: Path) -> None:
    if log.exists():
        return
    proc = subprocess.run(["nice", "-n", "5", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    log.write_text(proc.stdout + proc.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("llama_perplexity")
    ap.add_argument("--imatrix", required=True)
    ap.add_argument("--presets", nargs="+", default=["q4_k_m", "q4_k_s", "q5_k_m", "q6_k", "q4_0"])
    ap.add_argument("--bf16", default="/tmp/imx/demo.bf16.gguf")
    ap.add_argument("--text", default=str(builtin_eval_path()), help="default: the shipped evaluation text")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/imx")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    d = Path(args.dir)
    ppl = [args.llama_perplexity, "-f", args.text, "-c", str(args.ctx), "--chunks", str(args.chunks),
           "-t", str(args.threads)]
    base = d / f"kld.bf16.{args.chunks}x{args.ctx}.bin"
    run([*ppl, "-m", args.bf16, "--kl-divergence-base", str(base)], d / "ppl.bf16.log")

    rows = []
    for p in args.presets:
        row = {"preset": p}
        for tag, extra in (("none", []), ("imx", ["--imatrix-file", args.imatrix])):
            f = d / (f"gq.{p}.gguf" if tag == "none" else f"gq.{p}.imx.gguf")
            if not f.exists():
                run(["gemmaquant", "quantize", "demo", "--scheme", p, *extra, "-o", str(f), "-q"],
                    d / f"gq.{p}.{tag}.quantize.log")
            log = d / (f"kld.{p}.log" if tag == "none" else f"kld.{p}.imx.log")
            run([*ppl, "-m", str(f), "--kl-divergence-base", str(base), "--kl-divergence"], log)
            row[tag] = parse_kld_log(log.read_text())
        row["imatrix_lower_kl"] = row["imx"]["kl_mean"] < row["none"]["kl_mean"]
        rows.append(row)

    print(f"\n{args.chunks} chunks x {args.ctx} of {args.text}; KL(bf16 ‖ Q) by llama-perplexity\n")
    print("| preset | KL mean, no imatrix | KL mean, imatrix | KL ratio | top-1 % no / with | "
          "Δppl no / with | imatrix KL lower |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        a, b = r["none"], r["imx"]
        print(f"| {r['preset']} | {a['kl_mean']:.5f} ± {a['kl_mean_pm']:.5f} | {b['kl_mean']:.5f} ± "
              f"{b['kl_mean_pm']:.5f} | {b['kl_mean'] / a['kl_mean']:.2f} | {a['top1_pct']:.2f} / "
              f"{b['top1_pct']:.2f} | {a['dppl']:+.4f} / {b['dppl']:+.4f} | "
              f"{'yes' if r['imatrix_lower_kl'] else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"chunks": args.chunks, "ctx": args.ctx, "text": args.text,
                                               "imatrix": args.imatrix, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
