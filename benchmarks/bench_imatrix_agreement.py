"""Our importance matrix vs llama-imatrix's on the same token chunks of the same text (issue 4 §5).

    python benchmarks/bench_imatrix_agreement.py LLAMA_IMATRIX [--gguf demo.bf16.gguf] [--text FILE]
        [--ctx 512] [--chunks N] [--threads 2] [--out-dir /tmp/imx] [--json FILE]

LLAMA_IMATRIX is a llama-imatrix binary (built from the llama-cpp-python sdist). --gguf is the demo
model's bf16 GGUF (`gemmaquant quantize demo --scheme bf16 -o FILE`, byte-identical to
convert_hf_to_gguf's), which llama-imatrix runs; ours runs the HF checkpoint (`demo`) through the
float32 forward pass. Default text: gemmaquant's built-in calibration text.

Same chunks on both sides: llama-imatrix tokenizes the whole text with BOS (`--parse-special`, as our
tokenizer parses `<start_of_turn>` etc.), cuts it into len//ctx chunks and overwrites each chunk's first
token with BOS; `gemmaquant.calib.imatrix.llama_chunks` does the same, after checking that llama.cpp's
tokenizer (llama-cpp-python, vocab only) gives the very same ids as ours.

Both files are read with the `gguf` package. Per tensor: Pearson r of the per-column mean squares
(in_sum2 / counts), the ratio of their means (ours / llama.cpp), and the largest relative column
difference. Prints a markdown table (worst tensors first, plus per-kind min / median) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def read_imatrix(path: Path) -> tuple[dict[str, np.ndarray], dict[str, float], dict]:
    """GGUF imatrix → ({weight: in_sum2 f64}, {weight: count}, {key: value}) via the gguf package."""
    import gguf

    r = gguf.GGUFReader(path)
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.array(t.data, dtype=np.float64).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = float(np.array(t.data).reshape(-1)[0])
    meta = {k: r.fields[k].parts[-1][0].item() for k in ("imatrix.chunk_count", "imatrix.chunk_size")}
    return sums, counts, meta


def compare(ours: Path, ref: Path) -> tuple[list[dict], dict, dict]:
    s_o, c_o, m_o = read_imatrix(ours)
    s_r, c_r, m_r = read_imatrix(ref)
    if set(s_o) != set(s_r):
        raise SystemExit(f"entries differ: only ours {sorted(set(s_o) - set(s_r))[:5]}, "
                         f"only llama.cpp {sorted(set(s_r) - set(s_o))[:5]}")
    rows = []
    for name in sorted(s_r, key=_natural):
        a, b = s_o[name] / c_o[name], s_r[name] / c_r[name]  # mean of x² per input column
        rows.append({"tensor": name, "n": a.size, "count_ours": c_o[name], "count_llama": c_r[name],
                     "pearson": float(np.corrcoef(a, b)[0, 1]), "mean_ratio": float(a.mean() / b.mean()),
                     "max_rel_diff": float(np.max(np.abs(a - b) / np.maximum(b, 1e-30)))})
    return rows, m_o, m_r


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def kind_of(name: str) -> str:
    return name.split(".")[2]  # blk.N.<kind>.weight


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for kind in sorted({kind_of(r["tensor"]) for r in rows}):
        rs = [r for r in rows if kind_of(r["tensor"]) == kind]
        p = [r["pearson"] for r in rs]
        q = [r["mean_ratio"] for r in rs]
        out.append({"kind": kind, "tensors": len(rs), "pearson_min": min(p), "pearson_median": statistics.median(p),
                    "mean_ratio_min": min(q), "mean_ratio_max": max(q)})
    p = [r["pearson"] for r in rows]
    q = [r["mean_ratio"] for r in rows]
    out.append({"kind": "all", "tensors": len(rows), "pearson_min": min(p), "pearson_median": statistics.median(p),
                "mean_ratio_min": min(q), "mean_ratio_max": max(q)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("llama_imatrix")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--gguf", default="/tmp/imx/demo.bf16.gguf")
    ap.add_argument("--text", default=None, help="default: gemmaquant's built-in calibration text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=-1, help="-1: all whole chunks of the text")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="/tmp/imx")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worst", type=int, default=10, help="tensors to list individually (lowest r first)")
    ap.add_argument("--reuse", action="store_true", help="compare the files of an earlier run, run nothing")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from gemmaquant.calib.data import default_text, load_tokenizer_for
    from gemmaquant.formats.checkpoint import resolve_model
    from gemmaquant.calib.imatrix import compute_imatrix, llama_chunks

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path = Path(args.text) if args.text else out_dir / "default_calib.txt"
    if not args.text:
        text_path.write_text(default_text(), encoding="utf-8")
    text = text_path.read_text(encoding="utf-8")

    ckpt = resolve_model(args.model)
    tok = load_tokenizer_for(ckpt.path)
    ids = tok.encode(text, add_bos=True, parse_special=True)
    try:  # llama.cpp's own tokenization of the same text, as llama-imatrix --parse-special does it
        import llama_cpp

        llm = llama_cpp.Llama(args.gguf, vocab_only=True, verbose=False)
        ref_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if ref_ids != ids:
            raise SystemExit(f"tokenizations differ ({len(ids)} ours vs {len(ref_ids)} llama.cpp tokens)")
        print(f"tokenization: {len(ids)} tokens, identical to llama.cpp's", file=sys.stderr)
    except ImportError:
        print("llama_cpp not importable: tokenization not cross-checked", file=sys.stderr)
    chunks = llama_chunks(ids, args.ctx, ckpt.config.bos_token_id, args.chunks)
    n = chunks.shape[0]

    ref_path = out_dir / f"imatrix.llama.{n}x{args.ctx}.gguf"
    cmd = [args.llama_imatrix, "-m", args.gguf, "-f", str(text_path), "-o", str(ref_path), "-c", str(args.ctx),
           "--chunks", str(n), "--parse-special", "--no-ppl", "-t", str(args.threads)]
    print(" ".join(cmd), file=sys.stderr)
    ours_path = out_dir / f"imatrix.ours.{n}x{args.ctx}.gguf"
    t_llama = t_ours = float("nan")
    if not args.reuse:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        t_llama = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"llama-imatrix failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        t0 = time.perf_counter()
        im = compute_imatrix(ckpt, ids=chunks, dataset=str(text_path))
        t_ours = time.perf_counter() - t0
        ours_path.unlink(missing_ok=True)
        im.save(ours_path)

    rows, m_o, m_r = compare(ours_path, ref_path)
    summary = summarize(rows)
    print(f"\n{n} chunks x {args.ctx} tokens of {text_path}; {len(rows)} tensors; "
          f"chunk_count ours {m_o['imatrix.chunk_count']} / llama.cpp {m_r['imatrix.chunk_count']}; "
          f"time ours {t_ours:.0f} s, llama-imatrix {t_llama:.0f} s (shared 2-core machine)\n")
    # r is printed with 1 − r beside it: at these agreements "1.00000" alone says nothing
    print("| kind | tensors | Pearson min (1 − r) | Pearson median (1 − r) | mean ratio min | mean ratio max |")
    print("|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['kind']} | {s['tensors']} | {s['pearson_min']:.6f} ({1 - s['pearson_min']:.1e}) | "
              f"{s['pearson_median']:.6f} ({1 - s['pearson_median']:.1e}) | "
              f"{s['mean_ratio_min']:.4f} | {s['mean_ratio_max']:.4f} |")
    print("\n| tensor (lowest r) | n | counts ours / llama | Pearson (1 − r) | mean ratio | max rel diff |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["pearson"])[: args.worst]:
        print(f"| {r['tensor']} | {r['n']} | {r['count_ours']:.0f} / {r['count_llama']:.0f} | "
              f"{r['pearson']:.6f} ({1 - r['pearson']:.1e}) | {r['mean_ratio']:.4f} | {r['max_rel_diff']:.3f} |")
    below = [r["tensor"] for r in rows if r["pearson"] < 0.99]
    print(f"\ntensors with r < 0.99: {len(below)} {below[:10]}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "text": str(text_path), "chunks": n, "ctx": args.ctx, "llama_cmd": cmd, "ours": str(ours_path),
            "llama": str(ref_path), "seconds_ours": t_ours, "seconds_llama": t_llama,
            "summary": summary, "tensors": rows}, indent=1))


if __name__ == "__main__":
    main()
