"""Dequantizers on a GPU (issue 5 §1 and §5): bit-equality of the plain torch kernels on CUDA with the CPU
(which the tests hold bit-equal to gguf's numpy and to compressed-tensors), and effective bandwidth
against the card's own device-to-device copy bandwidth (target >= 50%).

    python benchmarks/bench_gpu_dequant.py [--device cuda] [--rows 8192] [--cols 8192] [--repeats 20]

One short script, prepared to be run as is on a lent GPU machine; `--device cpu` runs the same checks
on the CPU (that is how it is tested here). For each GGML type and each compressed-tensors format:
bytes read + bytes written per call (packed input, float32 output for GGML as gguf defines it, bf16 for
compressed-tensors as its decompress returns), median time over --repeats calls (CUDA events, after a
warm-up), GB/s, and that figure over the D2D copy's: `dst.copy_(src)` of a float32 tensor of the same
output size, counted as its read + its write. Every output is compared bit for bit with the CPU's first.
Prints a markdown table; exits 1 if any output differs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from gemmaquant.numerics.ct import dequantize_tensors, quantize_fp8, quantize_int8, quantize_pack
from gemmaquant.numerics.ggml.dequantize import dequantize
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.types import GGMLType

GGML = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
        GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.F16, GGMLType.BF16]  # fmt: skip


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds per call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ct_cases(w: torch.Tensor):
    """(name, {suffix: tensor}, format, num_bits) for our compressed-tensors layouts."""
    return [
        ("FP8 channel", quantize_fp8(w, "channel").tensors(), "float-quantized", 8),
        ("FP8 tensor", quantize_fp8(w, "tensor").tensors(), "float-quantized", 8),
        ("INT8 channel", quantize_int8(w).tensors(), "int-quantized", 8),
        ("INT4 g128 sym", quantize_pack(w, 4, group_size=128, symmetric=True).tensors(), "pack-quantized", 4),
        ("INT4 g128 asym", quantize_pack(w, 4, group_size=128, symmetric=False).tensors(), "pack-quantized", 4),
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu to check the script itself")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    shape = (a.rows, a.cols)
    n = a.rows * a.cols

    src = torch.empty(n, dtype=torch.float32, device=dev).normal_()
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), dev, a.repeats)
    copy_gbs = 2 * 4 * n / copy_s / 1e9
    print(f"torch {torch.__version__} on {name}; {a.rows}x{a.cols}; D2D copy of {4 * n / 2**20:.0f} MiB float32: "
          f"{copy_gbs:.0f} GB/s (read + write)\n")
    print("| format | bytes in | bytes out | ms | G values/s | GB/s | of D2D copy | bits equal to CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    ok = True

    def row(label: str, nin: int, nout: int, s: float, equal: bool) -> None:
        gbs = (nin + nout) / s / 1e9
        print(f"| {label} | {nin / 2**20:.0f} MiB | {nout / 2**20:.0f} MiB | {s * 1e3:.2f} | {n / s / 1e9:.1f} "
              f"| {gbs:.0f} | {gbs / copy_gbs:.0%} | {'yes' if equal else '**NO**'} |")

    g = torch.Generator().manual_seed(0)
    w64 = torch.randn(64, a.cols, generator=g) * 0.02
    for qtype in GGML:
        data = quantize(w64, qtype).repeat(a.rows // 64, 1)  # valid blocks, tiled
        ref = dequantize(data, qtype, shape, compiled=False)  # CPU plain path
        data_d = data.to(dev)
        out = torch.empty(shape, dtype=torch.float32, device=dev)
        got = dequantize(data_d, qtype, shape, out=out, compiled=False)
        equal = torch.equal(got.cpu().view(torch.int32), ref.view(torch.int32))
        ok &= equal
        s = timed(lambda data_d=data_d, qtype=qtype, out=out: dequantize(data_d, qtype, shape, out=out, compiled=False),
                  dev, a.repeats)
        row(qtype.name, data.numel(), 4 * n, s, equal)

    w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    for label, tensors, fmt, bits in ct_cases(w):
        ref = dequantize_tensors(tensors, fmt, bits)
        td = {k: v.to(dev) for k, v in tensors.items()}
        got = dequantize_tensors(td, fmt, bits)
        equal = got.dtype == ref.dtype and torch.equal(got.cpu(), ref)
        ok &= equal
        s = timed(lambda td=td, fmt=fmt, bits=bits: dequantize_tensors(td, fmt, bits), dev, a.repeats)
        nin = sum(v.numel() * v.element_size() for v in tensors.values())
        row(label, nin, got.numel() * got.element_size(), s, equal)
    if not ok:
        print("\nSOME OUTPUTS DIFFER FROM THE CPU'S", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
