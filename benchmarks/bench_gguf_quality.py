"""Quality of every GGUF preset on one model (the demo by default): perplexity and KL against the bf16 model,
each measured twice, by our `compare` (evaluate/compare.py) and by llama-perplexity --kl-divergence on the
same file and text (issue 20: the preset table's ppl and KL columns).

    python benchmarks/bench_gguf_quality.py --llama-bin BUILD/bin --dir WORK [--presets all|q4_k_m,q6_k,...]
        [--source ours|llama-quantize] [--imatrix FILE] [--text FILE] [--ctx 512] [--chunks 8]
        [--threads 2] [--json OUT] [--check-identity [--identity-only]]

BUILD/bin holds llama-quantize and llama-perplexity (a plain CMake build of the pinned llama.cpp; both get
`-nr`, no weight repacking). Per preset P:
* the file: `--source ours` writes it with our writer (`write_gguf`, what `gemmaquant quantize` runs);
  `--source llama-quantize` runs llama-quantize on our bf16 GGUF (byte-identical to convert_hf_to_gguf.py's)
  instead, which is faster for the IQ presets; with `--check-identity` both are made and compared byte for byte
  (the measurement then uses ours). The importance matrix (`--imatrix`, else ours computed once by
  `gemmaquant imatrix` on its built-in calibration text, 16 x 256 tokens) goes only to the presets llama-quantize
  refuses without one, as in the size table;
* llama-perplexity on --text with `--kl-divergence-base` from the bf16 GGUF (computed once) and
  `--kl-divergence`: PPL(Q), mean KLD, "Same top p";
* ours: `compare_artifacts(HF checkpoint, [file])` on the same text, ctx and chunks (llama-perplexity's
  chunking; KL over the top-128 tokens plus the remainder mass, a lower bound of the exact KL).
Default text: the shipped evaluation text (gemmaquant/formats/texts/default_eval.txt). Files and logs already in
--dir are reused (delete to redo); preset files are deleted after scoring unless --keep.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_gguf_optimized import run  # noqa: E402  (once; its log is the cache)
from bench_gguf_presets import same_bytes  # noqa: E402
from bench_imatrix_quality import parse_kld_log  # noqa: E402


def main() -> None:
    from gemmaquant.errors import GemmaQuantError
    from gemmaquant.evaluate.compare import compare_artifacts
    from gemmaquant.export.gguf.writer import write_gguf
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.formats.demo import ensure_demo_checkpoint
    from gemmaquant.formats.texts import builtin_eval_path, eval_text
    from gemmaquant.formats.gguf.imatrix import read_imatrix
    from gemmaquant.schemes import GGUF_NEEDS_IMATRIX, SCHEMES, get_scheme

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo", help="HF checkpoint directory, or demo")
    ap.add_argument("--llama-bin", type=Path, required=True, help="folder with llama-quantize and llama-perplexity")
    ap.add_argument("--dir", type=Path, required=True, help="work folder (files and logs are reused)")
    ap.add_argument("--presets", default="all")
    ap.add_argument("--source", choices=("ours", "llama-quantize"), default="ours")
    ap.add_argument("--check-identity", action="store_true", help="make both files and compare their bytes")
    ap.add_argument("--identity-only", action="store_true",
                    help="with --check-identity: compare the files, measure nothing (minutes less per preset)")
    ap.add_argument("--imatrix", type=Path, help="imatrix GGUF for the presets that need one (default: ours)")
    ap.add_argument("--text", type=Path, default=builtin_eval_path())
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    d = a.dir
    d.mkdir(parents=True, exist_ok=True)
    model = ensure_demo_checkpoint() if a.model == "demo" else Path(a.model)
    ckpt = Checkpoint(model)
    presets = [p for p in SCHEMES if SCHEMES[p].is_gguf and p != "bf16"] if a.presets == "all" \
        else [get_scheme(p).name for p in a.presets.split(",")]

    bf16 = d / "bf16.gguf"
    if not bf16.exists():
        write_gguf(ckpt, "bf16", bf16)
    imx_path = a.imatrix
    if imx_path is None and any(p in GGUF_NEEDS_IMATRIX for p in presets):
        imx_path = d / "imatrix.gguf"
        run([sys.executable, "-m", "gemmaquant.cli", "imatrix", str(model), "--out", str(imx_path),
             "--calib-samples", "16", "--calib-len", "256"], d / "imatrix.log")
    ppl = [a.llama_bin / "llama-perplexity", "-f", a.text, "-c", a.ctx, "--chunks", a.chunks, "-t", a.threads,
           "-nr"]
    base = d / f"kld.bf16.{a.chunks}x{a.ctx}.bin"
    if a.identity_only and not a.check_identity:
        raise SystemExit("--identity-only needs --check-identity")
    if not a.identity_only:
        run([*ppl, "-m", bf16, "--kl-divergence-base", base], d / f"ppl.bf16.{a.chunks}x{a.ctx}.log")
    text = eval_text(a.text)

    rows = []
    for p in presets:
        s = get_scheme(p)
        imx = imx_path if p in GGUF_NEEDS_IMATRIX else None
        row = {"preset": p, "imatrix": imx is not None}
        ours, theirs = d / f"ours.{p}.gguf", d / f"llama.{p}.gguf"
        t0 = time.perf_counter()
        if a.source == "ours" or a.check_identity:
            if not ours.exists():
                try:
                    im = None if imx is None else read_imatrix(imx)
                    write_gguf(ckpt, p, ours, imatrix=None if im is None else im.importance,
                               imatrix_meta=None if im is None else im.meta())
                except GemmaQuantError as e:
                    rows.append({**row, "refused": str(e)})
                    print(f"{p}: refused: {e}", flush=True)
                    continue
                row["ours_s"] = round(time.perf_counter() - t0, 1)
        if a.source == "llama-quantize" or a.check_identity:
            if not theirs.exists():
                run([a.llama_bin / "llama-quantize", *(["--imatrix", imx] if imx else []), bf16, theirs,
                     str(s.ftype), a.threads], d / f"quantize.{p}.log")
        if a.check_identity:
            row["identical"] = same_bytes(ours, theirs)
        f = ours if a.source == "ours" or a.check_identity else theirs
        row["file"], row["bytes"] = f.name, f.stat().st_size
        if a.identity_only:
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not a.keep:
                for g in (ours, theirs):
                    g.unlink(missing_ok=True)
            continue
        row["llama"] = parse_kld_log(run([*ppl, "-m", f, "--kl-divergence-base", base, "--kl-divergence"],
                                         d / f"kld.{p}.{f.name.split('.')[0]}.{a.chunks}x{a.ctx}.log"))
        rep = compare_artifacts(str(model), [str(f)], text, ctx=a.ctx, chunks=a.chunks)
        art = rep["artifacts"][0]
        row["ours"] = {"ppl": art["ppl"], "ppl_base": rep["base"]["ppl"], "kl_mean": art["kl_mean"],
                       "top1": art["top1"]}
        row["bpw_file"] = art["bpw_file"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not a.keep:
            for g in (ours, theirs):
                g.unlink(missing_ok=True)

    if a.identity_only:
        print("\n| preset | bytes | file = llama-quantize's | ours s |\n|---|---:|---|---:|")
        for r in rows:
            print(f"| {r['preset']} | {r.get('bytes', '')} | "
                  f"{'refused: ' + r['refused'] if 'refused' in r else 'yes' if r['identical'] else 'NO'} | "
                  f"{r.get('ours_s', '')} |")
        return
    print(f"\n{a.chunks} chunks x {a.ctx} tokens of {a.text.name}; base: bf16 (ours ppl "
          f"{rows[0]['ours']['ppl_base']:.4f}, llama-perplexity {rows[0]['llama']['ppl_base']:.4f})\n")
    print("| preset | bits/weight | ppl (ours) | ppl (llama.cpp) | Δppl (llama.cpp) | KL (ours, top-128) "
          "| KL (llama.cpp) | top-1 (ours) | top-1 (llama.cpp) |" + (" file = llama-quantize's |" if a.check_identity else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if a.check_identity else ""))
    for r in rows:
        if "refused" in r:
            print(f"| {r['preset']} | refused: {r['refused']} |")
            continue
        o, ll = r["ours"], r["llama"]
        ident = f" {'yes' if r['identical'] else 'NO'} |" if a.check_identity else ""
        print(f"| {r['preset']}{' (imatrix)' if r['imatrix'] else ''} | {r['bpw_file']:.3f} | {o['ppl']:.4f} | "
              f"{ll['ppl_q']:.4f} | {ll['dppl'] / ll['ppl_base']:+.2%} | {o['kl_mean']:.5f} | "
              f"{ll['kl_mean']:.5f} ± {ll['kl_mean_pm']:.5f} | {o['top1']:.4f} | {ll['top1_pct'] / 100:.4f} |{ident}")
    if a.json:
        a.json.write_text(json.dumps({"ctx": a.ctx, "chunks": a.chunks, "text": str(a.text), "source": a.source,
                                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
