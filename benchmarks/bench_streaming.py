"""Wall time, peak RSS and output bytes of `gemmaquant quantize` on real model shapes, beside llama.cpp's
`convert_hf_to_gguf.py` + llama-quantize on the same checkpoint (issue 6 §2).

    python benchmarks/make_synthetic.py gemma-2-9b /tmp/synth/gemma-2-9b
    python benchmarks/bench_streaming.py /tmp/synth/gemma-2-9b fp8 q4_k_m --llamacpp q4_k_m --out /tmp/bench
    python benchmarks/bench_streaming.py --table /tmp/bench/results.jsonl

A comma-separated scheme is one multi-preset command (`quantize --scheme a,b,c --out DIR/`, one read of
the checkpoint for all files), and a comma-separated --llamacpp one convert followed by one llama-quantize
per preset, with a row for the sum of the steps:

    python benchmarks/bench_streaming.py MODEL q8_0,q6_k,q4_k_m q8_0 q6_k q4_k_m --llamacpp q8_0,q6_k,q4_k_m

Every step runs in its own process; peak RSS is that process's VmHWM (the high-water mark of its
image since exec, read from /proc at exit), which, unlike ru_maxrss, does not include pages the
forking parent held. gemmaquant's GGUF writer forks worker processes, whose memory VmHWM does not
see, so the harness also samples the whole process tree every 0.2 s and records the peak of its summed
Pss (each shared page divided among the processes mapping it: forked workers are not double-counted)
and summed Rss (an upper bound). Outputs are deleted after measuring (they can be 10+ GB); results are appended
as JSON lines. llama.cpp's converter comes from the llama-cpp-python 0.3.36 sdist (the library's own
tree, `tests/export/gguf/llamacpp_ref.llamacpp_tree`), llama-quantize is `llama_cpp.llama_model_quantize`
with nthread = the CPU count.

`--cold` starts each tool's first step with an empty page cache (sync, then `echo 3 >
/proc/sys/vm/drop_caches`, which needs root): on a 24 GiB machine an 18.5 GB checkpoint is partly
cached after whichever tool read it last, so without it the order of the runs decides who reads from
disk. llama-quantize then reads the converter's fresh file from the cache, as it would in practice.
`--compile` passes `--compile` to every gemmaquant command (its rows' scheme says so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_HWM = """
import atexit, sys
def _hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    sys.stderr.write("VmHWM-bytes %d\\n" % (int(line.split()[1]) * 1024))
atexit.register(_hwm)
"""
_GEMMAQUANT = _HWM + """
from gemmaquant.cli.app import main
sys.argv = ["gemmaquant"] + sys.argv[1:]
main()
"""
_CONVERT = _HWM + """
tree = sys.argv[1]
sys.path.insert(1, tree + "/gguf-py")
sys.path.insert(0, tree)
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outfile", sys.argv[3], "--outtype", "bf16"]
convert_hf_to_gguf.main()
"""
_QUANTIZE = _HWM + """
import ctypes, os, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3])
p.nthread = os.cpu_count()
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
sys.exit(rc)
"""


def llama_ftype(preset: str) -> int:
    """llama-quantize's ftype number of a preset (the registry keeps them: general.file_type)."""
    sys.path.insert(0, str(REPO))
    from gemmaquant.schemes import get_scheme

    return int(get_scheme(preset).ftype)


def drop_caches() -> None:
    """Empty the page cache (root only); raises if the kernel refuses."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemExit(f"--cold: cannot drop the page cache ({e}); run as root or without --cold")


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of Pss, sum of Rss) in bytes over `pid` and its descendants, from smaps_rollup. Pss
    shares each page among the processes mapping it, so forked workers are not double-counted."""
    pss = rss = 0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return pss, rss


class _Sampler(threading.Thread):
    """Peak of the process tree's summed Pss (and Rss), sampled every 0.2 s while it runs."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_pss, self.peak_rss = pid, 0, 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.2):
            pss, rss = tree_memory(self.pid)
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)


LAST_TREE: dict = {}  # the last _run's sampled peaks


def _run(code: str, args: list[str], log: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `python -c code args`; raises with the log tail on failure.
    Peak RSS is the main process's VmHWM; the sampled peaks of the whole process tree (worker
    processes included) are left in LAST_TREE."""
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=lf, stderr=subprocess.STDOUT)
        sampler = _Sampler(proc.pid)
        sampler.start()
        proc.wait()
        sampler.stop.set()
        sampler.join()
        r = proc
    wall = time.perf_counter() - t0
    LAST_TREE.update(pss=sampler.peak_pss, rss=sampler.peak_rss)
    text = log.read_text(errors="replace")
    if r.returncode != 0:
        raise SystemExit(f"{args}: exit {r.returncode}\n{text[-3000:]}")
    hwm = [int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("VmHWM-bytes ")]
    return wall, hwm[-1]


def bench_gemmaquant(model: Path, scheme: str, out_dir: Path, extra: list[str] = (), cold: bool = False) -> dict:
    """One `gemmaquant quantize` command; a comma-separated scheme writes the set into a folder."""
    if cold:
        drop_caches()
    if "," in scheme:
        out = out_dir / f"{model.name}.set"
    else:
        out = out_dir / (f"{model.name}.{scheme}.gguf" if not scheme.startswith(("fp8", "int8", "w4", "w8"))
                         else f"{model.name}-{scheme}")
    wall, rss = _run(_GEMMAQUANT, ["quantize", str(model), "--scheme", scheme, "-o", str(out), "-q", *extra],
                     out_dir / f"gq-{model.name}-{scheme.replace(',', '+')}.log")
    size = _size(out)
    shutil.rmtree(out) if out.is_dir() else out.unlink()
    return {"tool": "gemmaquant", "model": model.name, "scheme": scheme + (" " + " ".join(extra) if extra else ""),
            "seconds": round(wall, 1), "peak_rss_bytes": rss, "output_bytes": size, "cold": cold,
            "tree_peak_pss_bytes": LAST_TREE["pss"], "tree_peak_rss_bytes": LAST_TREE["rss"]}


def bench_llamacpp(model: Path, presets: str, out_dir: Path, cold: bool = False) -> list[dict]:
    """convert_hf_to_gguf.py (bf16) once, then llama-quantize once per comma-separated preset."""
    sys.path.insert(0, str(REPO))
    from tests.export.gguf.llamacpp_ref import llamacpp_tree

    tree = llamacpp_tree()
    bf16 = out_dir / f"{model.name}.lcpp-bf16.gguf"
    if cold:
        drop_caches()
    w, r = _run(_CONVERT, [str(tree), str(model), str(bf16)], out_dir / f"lcpp-convert-{model.name}.log")
    rows = [{"tool": "llama.cpp convert_hf_to_gguf (bf16)", "model": model.name, "scheme": "bf16",
             "seconds": round(w, 1), "peak_rss_bytes": r, "output_bytes": _size(bf16), "cold": cold,
             "tree_peak_pss_bytes": LAST_TREE["pss"], "tree_peak_rss_bytes": LAST_TREE["rss"]}]
    for preset in presets.split(","):
        quant = out_dir / f"{model.name}.lcpp-{preset}.gguf"
        w, r = _run(_QUANTIZE, [str(bf16), str(quant), str(llama_ftype(preset))],
                    out_dir / f"lcpp-quantize-{model.name}-{preset}.log")
        rows.append({"tool": "llama.cpp llama-quantize", "model": model.name, "scheme": preset,
                     "seconds": round(w, 1), "peak_rss_bytes": r, "output_bytes": _size(quant), "cold": False,
                     "tree_peak_pss_bytes": LAST_TREE["pss"], "tree_peak_rss_bytes": LAST_TREE["rss"]})
        quant.unlink()
    bf16.unlink()
    steps = "both steps" if len(rows) == 2 else f"convert + {len(rows) - 1} quantizes"
    rows.append({"tool": f"llama.cpp {steps}", "model": model.name, "scheme": presets,
                 "seconds": round(sum(x["seconds"] for x in rows), 1),
                 "peak_rss_bytes": max(x["peak_rss_bytes"] for x in rows),
                 "output_bytes": sum(x["output_bytes"] for x in rows[1:]), "cold": cold,
                 "tree_peak_pss_bytes": max(x["tree_peak_pss_bytes"] for x in rows),
                 "tree_peak_rss_bytes": max(x["tree_peak_rss_bytes"] for x in rows)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | tool | scheme | wall s | peak RSS GiB | tree peak PSS GiB | output GB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        pss = r.get("tree_peak_pss_bytes")
        lines.append(f"| {r['model']} | {r['tool']} | {r['scheme']} | {r['seconds']:.1f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} | {'—' if pss is None else f'{pss / 2**30:.2f}'} | "
                     f"{r['output_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("schemes", nargs="*", help="gemmaquant schemes to run (fp8, q4_k_m, fp8-static, ...; "
                                               "q8_0,q6_k,q4_k_m: one multi-preset command)")
    ap.add_argument("--llamacpp", action="append", default=[],
                    help="llama.cpp preset(s) to run after one convert (q4_k_m, or q8_0,q6_k,q4_k_m)")
    ap.add_argument("--calib-samples", type=int, help="for calibrated schemes: --calib-samples N")
    ap.add_argument("--calib-len", type=int, help="for calibrated schemes: --calib-len L")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--cold", action="store_true", help="empty the page cache before each tool (root)")
    ap.add_argument("--compile", action="store_true", help="gemmaquant with --compile (the compiled searches)")
    ap.add_argument("--table", type=Path, help="print a results.jsonl as a markdown table and exit")
    a = ap.parse_args(argv)
    if a.table:
        print(table([json.loads(ln) for ln in a.table.read_text().splitlines() if ln.strip()]))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    results = a.out / "results.jsonl"
    for scheme in a.schemes:
        extra = (["--calib-samples", str(a.calib_samples)] if a.calib_samples else []) + \
            (["--calib-len", str(a.calib_len)] if a.calib_len else []) + (["--compile"] if a.compile else [])
        rows = [bench_gemmaquant(a.model, scheme, a.out, extra, a.cold)]
        for r in rows:
            print(json.dumps(r), flush=True)
            with open(results, "a") as f:
                f.write(json.dumps(r) + "\n")
    for preset in a.llamacpp:
        for r in bench_llamacpp(a.model, preset, a.out, a.cold):
            print(json.dumps(r), flush=True)
            with open(results, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
