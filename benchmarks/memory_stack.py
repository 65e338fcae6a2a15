"""Where a gemmaquant command's memory peaks: runs the CLI in this process, samples
/proc/self/smaps_rollup every 0.1 s, and at each new peak of anonymous memory (the process's own:
tensors, the allocator's heap; not the page cache of files it maps) records the main thread's
gemmaquant stack. Prints a line every 20 s (anonymous and file-backed memory, the innermost frame) and,
at the end, the peak and its stack. One process only: use it for the commands that do not fork
workers (`--algorithm gptq`, budgets); `peak_memory.py` measures a whole process tree.

    python benchmarks/memory_stack.py quantize /tmp/synth/g431-L2 --scheme q4_k_m --algorithm gptq \\
        --calib-samples 4 --calib-len 64 --threads 2 -o OUT.gguf
"""

from __future__ import annotations

import sys
import threading
import time
import traceback


def memory() -> dict[str, float]:
    """GiB of Rss, Pss_Anon and Pss_File of this process."""
    got = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, *rest = line.split()
            if key in ("Rss:", "Pss_Anon:", "Pss_File:"):
                got[key[:-1]] = int(rest[0]) / 2**20
    return got


def main_thread_frames() -> list[str]:
    """The main thread's stack, gemmaquant's frames only, outermost first ("calib/runner.py:12 run_layers")."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    return [f"{s.filename.split('gemmaquant/')[-1]}:{s.lineno} {s.name}"
            for s in traceback.extract_stack(frame) if "gemmaquant" in s.filename]


def main() -> None:
    from gemmaquant.cli.app import main as cli

    peak = {"anon": 0.0, "file": 0.0, "at": 0.0, "stack": []}
    t0 = time.time()

    def sample() -> None:
        last = 0.0
        while True:
            m = memory()
            if m["Pss_Anon"] > peak["anon"]:
                peak.update(anon=m["Pss_Anon"], file=m["Pss_File"], at=time.time() - t0, stack=main_thread_frames())
            if time.time() - last > 20:
                last = time.time()
                where = main_thread_frames()
                print(f"[{time.time() - t0:6.0f} s] anonymous {m['Pss_Anon']:.2f} GiB, file {m['Pss_File']:.2f} GiB, "
                      f"in {where[-1] if where else '-'}", file=sys.stderr, flush=True)
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    sys.argv = ["gemmaquant"] + sys.argv[1:]
    try:
        cli()
    except SystemExit as e:
        rc = e.code
    else:
        rc = 0
    print(f"rc={rc} wall={time.time() - t0:.0f}s peak anonymous {peak['anon']:.2f} GiB (file-backed then "
          f"{peak['file']:.2f}) at {peak['at']:.0f} s, in:", file=sys.stderr)
    for s in peak["stack"]:
        print("   ", s, file=sys.stderr)


if __name__ == "__main__":
    main()
