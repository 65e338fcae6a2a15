"""Dequantization throughput: gemmaquant's torch kernels vs the `gguf` package's numpy ones.

    python benchmarks/bench_ggml_dequant.py [--rows 2048] [--cols 4096] [--repeats 5] [--device cpu]
        [--quantize] [--threads N]

Prints a markdown table of median values/s per GGML type (and checks the outputs are bit-equal).
With --quantize it also times our quantizer (`gemmaquant.ggml.quantize`) per type on a
N(0, 0.02) tensor of --qrows x --cols, without an imatrix.
"""

from __future__ import annotations

import argparse
import statistics
import time

import gguf
import numpy as np
import torch

from gemmaquant.ggml.dequantize import dequantize
from gemmaquant.ggml.quantize import quantize
from gemmaquant.ggml.types import GGMLType

TYPES = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
         GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.F16, GGMLType.BF16]  # fmt: skip


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantize", action="store_true")
    ap.add_argument("--qrows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.rows * args.cols
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {n / 1e6:.1f} M values\n")
    print("| type | gguf numpy (M values/s) | gemmaquant torch (M values/s) | speed-up |")
    print("|---|---:|---:|---:|")
    for qtype in TYPES:
        # Valid blocks from our quantizer on a 64-row slab, tiled to the full size.
        slab = quantize(torch.randn(64, args.cols) * 0.02, qtype)
        data = slab.repeat(args.rows // 64, 1)
        data_np = data.numpy()
        dev = data.to(args.device)
        gtype = gguf.GGMLQuantizationType(int(qtype))
        ref = gguf.quants.dequantize(data_np, gtype)
        ours = dequantize(dev, qtype, (args.rows, args.cols))
        assert np.array_equal(ours.cpu().numpy().view(np.uint32), ref.astype(np.float32).view(np.uint32))

        def run_ours() -> None:
            dequantize(dev, qtype, (args.rows, args.cols))
            if dev.is_cuda:
                torch.cuda.synchronize()

        t_np = _median_seconds(lambda: gguf.quants.dequantize(data_np, gtype), args.repeats)
        t_ours = _median_seconds(run_ours, args.repeats)
        print(f"| {qtype.name} | {n / t_np / 1e6:.0f} | {n / t_ours / 1e6:.0f} | {t_np / t_ours:.1f}x |")

    if args.quantize:
        print(f"\nQuantize (no imatrix), {args.qrows}x{args.cols} N(0, 0.02):\n")
        print("| type | gemmaquant quantize (M values/s) |")
        print("|---|---:|")
        w = (torch.randn(args.qrows, args.cols) * 0.02).to(args.device)
        for qtype in TYPES:
            t = _median_seconds(lambda: quantize(w, qtype), max(1, args.repeats // 2))
            print(f"| {qtype.name} | {w.numel() / t / 1e6:.1f} |")


if __name__ == "__main__":
    main()
