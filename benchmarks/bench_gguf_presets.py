"""Size and bits per weight of every GGUF preset on one model (the demo by default), and whether each
file is byte-identical to llama-quantize's (issue 20: the preset table in RESULTS.md and the README).

    python benchmarks/bench_gguf_presets.py --imatrix demo.imatrix.gguf \\
        --llama-quantize /path/to/llama-quantize --bf16 demo.bf16.gguf --out /tmp/presets

For each preset: our `write_gguf` from the HF checkpoint (with --imatrix only for the presets that
llama-quantize refuses without one, unless --imatrix-all), the file's bytes and bits per weight
(8 · file bytes / weights, the figure `gemmaquant quantize` reports), the wall time; with
--llama-quantize, the same preset by llama-quantize from --bf16 (llama.cpp's converter output, or our
bf16 file, which is byte-identical to it) with the same imatrix file, `cmp`-style identity and its time.
Files are deleted after measuring unless --keep. --sizes-only writes nothing: each file's size is
the header our writer would write plus every tensor's planned bytes padded to 32 (exact: the full run
checks it against the written files). Results go to OUT/presets.jsonl and a markdown table on stdout. Timings on a shared machine are indicative only: the table is about sizes and bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def same_bytes(a: Path, b: Path, chunk: int = 1 << 24) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def _predicted_size(ck, s, im):
    """(file bytes, plans) from the plan and the header alone."""
    from gemmaquant.numerics.ggml.types import row_bytes
    from gemmaquant.export.gguf.header import ALIGNMENT, header_bytes
    from gemmaquant.export.gguf.plan import plan_types

    plans = plan_types(ck.config, s, im is not None, has_lm_head="lm_head.weight" in ck.names())
    head, _ = header_bytes(ck.path, ck.config, s, plans, None if im is None else im.meta())
    data = 0
    for p in plans:
        n = p.numel // p.n_per_row * row_bytes(p.type, p.n_per_row)
        data += n + (-n % ALIGNMENT)
    return len(head) + data, plans


def main() -> None:
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.formats.demo import ensure_demo_checkpoint
    from gemmaquant.errors import GemmaQuantError
    from gemmaquant.formats.gguf.imatrix import read_imatrix
    from gemmaquant.export.gguf.writer import write_gguf
    from gemmaquant.schemes import SCHEMES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo", help="HF checkpoint directory, or demo")
    ap.add_argument("--presets", default="all", help="comma-separated GGUF presets (default: every one)")
    ap.add_argument("--imatrix", type=Path, help="imatrix file for the presets that need one")
    ap.add_argument("--imatrix-all", action="store_true", help="use --imatrix for every preset")
    ap.add_argument("--llama-quantize", type=Path, help="llama-quantize binary: also compare its file")
    ap.add_argument("--bf16", type=Path, help="bf16 GGUF of the model, llama-quantize's input")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--sizes-only", action="store_true", help="plan + header sizes, no quantizing")
    a = ap.parse_args()
    if a.llama_quantize and not a.bf16:
        ap.error("--llama-quantize needs --bf16")
    ck = Checkpoint(ensure_demo_checkpoint() if a.model == "demo" else Path(a.model))
    presets = [s.name for s in SCHEMES.values() if s.is_gguf] if a.presets == "all" else a.presets.split(",")
    im = read_imatrix(a.imatrix) if a.imatrix else None
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in presets:
        s = SCHEMES[name]
        use = None
        if im is not None and a.imatrix_all:
            use = im
        else:
            try:  # does llama-quantize refuse this preset without an imatrix on this model?
                from gemmaquant.export.gguf.plan import plan_types

                plan_types(ck.config, s, False, has_lm_head="lm_head.weight" in ck.names())
            except GemmaQuantError:
                if im is None:
                    print(f"{name}: skipped (needs --imatrix)", file=sys.stderr)
                    continue
                use = im
        predicted = _predicted_size(ck, s, use)
        if a.sizes_only:
            n = sum(p.numel for p in predicted[1])
            rows.append({"preset": name, "bytes": predicted[0], "weights": n, "bpw": 8 * predicted[0] / n,
                         "imatrix": use is not None, "seconds": "-"})
            continue
        ours = a.out / f"{name}.ours.gguf"
        t0 = time.perf_counter()
        rep = write_gguf(ck, s, ours, imatrix=None if use is None else use.importance,
                         imatrix_meta=None if use is None else use.meta(), force=True, workers=a.threads)
        row = {"preset": name, "bytes": rep.file_bytes, "weights": sum(p.numel for p in rep.plans),
               "bpw": 8 * rep.file_bytes / sum(p.numel for p in rep.plans), "imatrix": use is not None,
               "seconds": round(time.perf_counter() - t0, 1), "types": rep.type_counts,
               "fallback": rep.n_fallback, "size_as_predicted": rep.file_bytes == predicted[0]}
        if a.llama_quantize:
            theirs = a.out / f"{name}.llama.gguf"
            cmd = [str(a.llama_quantize), *(["--imatrix", str(a.imatrix)] if use is not None else []),
                   str(a.bf16), str(theirs), name.upper(), str(a.threads)]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            row["llama_seconds"] = round(time.perf_counter() - t0, 1)
            row["identical"] = r.returncode == 0 and same_bytes(ours, theirs)
            if r.returncode != 0:
                row["llama_error"] = r.stderr.strip().splitlines()[-1:]
            if not a.keep:
                theirs.unlink(missing_ok=True)
        if not a.keep:
            ours.unlink()
        rows.append(row)
        with open(a.out / "presets.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "types"}), file=sys.stderr, flush=True)
    print("| preset | MiB | bpw | imatrix | identical to llama-quantize | ours s | llama-quantize s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['bytes'] / 2**20:.2f} | {r['bpw']:.3f} | {'yes' if r['imatrix'] else 'no'} | "
              f"{ {True: 'yes', False: 'NO'}.get(r.get('identical'), '-') } | {r['seconds']} | "
              f"{r.get('llama_seconds', '-')} |")


if __name__ == "__main__":
    main()
