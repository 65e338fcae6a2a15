"""Wall time and peak memory of any command: the summed Pss (and Rss) of its process tree sampled every
0.2 s (bench_streaming.py's sampler), with the load average at its start and end (this machine is
shared: a time means little without it). Used for the size-budget runs of RESULTS.md §10.

    python benchmarks/peak_memory.py [--timeout S] -- python -m gemmaquant.cli quantize MODEL --scheme q4_k_m ...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_streaming import tree_memory  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, help="kill the command after this many seconds (reported)")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    t0, load0 = time.time(), os.getloadavg()[0]
    proc = subprocess.Popen(cmd)
    peak = {"pss": 0, "rss": 0, "at": 0.0}

    def sample():
        while proc.poll() is None:
            pss, rss = tree_memory(proc.pid)
            if pss > peak["pss"]:
                peak.update(pss=pss, at=time.time() - t0)
            peak["rss"] = max(peak["rss"], rss)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    try:
        rc = proc.wait(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = f"killed after {a.timeout:.0f} s"
    print(f"rc={rc} wall={time.time() - t0:.1f}s peak_pss={peak['pss'] / 2**30:.2f}GiB (at {peak['at']:.0f} s) "
          f"peak_rss={peak['rss'] / 2**30:.2f}GiB load={load0:.1f}->{os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
