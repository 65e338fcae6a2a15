"""Peak memory of the calibration's statistics passes, per layer: runs `run_layers` as GGUF
`--algorithm gptq` does (XᵀX and Σx², sequential, nothing quantized) and samples the process's
anonymous memory every 0.05 s, recording the peak of each phase and where the main thread was. At the
end: what is still allocated after `run_layers` returned (should be the final hidden states alone).
To compare trees, run this file with another checkout first on PYTHONPATH (RESULTS.md §11, fifteenth
round):

    python benchmarks/make_synthetic.py gemma-4-31b /tmp/synth/g431-L2 --layers 2
    python benchmarks/stats_memory.py /tmp/synth/g431-L2 --samples 8 --len 512
    PYTHONPATH=/path/to/old/checkout python benchmarks/stats_memory.py /tmp/synth/g431-L2 --samples 8 --len 512
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from memory_stack import main_thread_frames, memory


def anonymous_gib() -> float:
    return memory()["Pss_Anon"]


def main(argv=None):
    import gemmaquant
    from gemmaquant.calib.data import calibration_batches, load_tokenizer_for
    from gemmaquant.calib.runner import run_layers
    from gemmaquant.formats.checkpoint import Checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"gemmaquant from {gemmaquant.__file__}")

    phase = {"name": "load"}
    peaks: dict[str, tuple[float, list[str]]] = {}

    def sample() -> None:
        while True:
            m, p = anonymous_gib(), phase["name"]
            if m > peaks.get(p, (0.0,))[0]:
                peaks[p] = (m, main_thread_frames()[-2:])
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    ckpt = Checkpoint(a.model)
    tok = load_tokenizer_for(ckpt.path, rows=ckpt.config.vocab_size)
    ids = calibration_batches(tok, None, a.samples, a.len, bos_id=ckpt.config.bos_token_id)
    t0 = time.time()

    def progress(done, total, what):
        phase["name"] = f"{what} statistics" if what else "returned"

    def on_layer(i, layer, stats):
        phase["name"] = f"layer {i} second pass"

    h = run_layers(ckpt, ids, kinds={"xtx", "sum_sq"}, on_layer=on_layer, sequential=True, progress=progress)
    wall = time.time() - t0
    time.sleep(0.2)
    for p, (m, where) in peaks.items():
        print(f"{p:24s} peak {m:5.2f} GiB  in {' < '.join(reversed(where))}")
    print(f"after run_layers returned: {anonymous_gib():.2f} GiB anonymous "
          f"(its result: {h.numel() * h.element_size() / 2**30:.2f} GiB); wall {wall:.0f} s")


if __name__ == "__main__":
    main()
