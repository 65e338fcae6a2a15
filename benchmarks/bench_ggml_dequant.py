"""GGML kernel throughput: gemmaquant's torch dequantizers vs the `gguf` package's numpy ones, and
(with --quantize) gemmaquant's quantizers vs llama.cpp's own C quantizer (libggml-base).

    python benchmarks/bench_ggml_dequant.py [--rows 2048] [--cols 4096] [--repeats 7] [--threads N]
        [--types Q8_0,Q6_K | new | all] [--quantize] [--qrows 256] [--imatrix] [--ct] [--compile] [--native]

`--types new` runs the types of the family modules (Q2_K, Q3_K, IQ4_*, TQ*, IQ3_*, IQ2_*, IQ1_*),
`all` those and the default list. The IQ quantizers run at 1-20 us per weight: use --qrows 32..64
for them. IQ2_XXS, IQ2_XS and IQ1_S quantize only with --imatrix (llama.cpp requires one); their
dequantization rows use blocks made with a random imatrix. llama.cpp's one-time IQ table setup
(seconds) is paid before the timed calls, and so is ours.

Prints markdown tables of median M values/s per GGML type, checking every output first (dequant:
bit-equal to gguf's; quantize: byte-equal to libggml's when it loads). Two clocks: `wall`
(what a user waits) and `cpu` (process CPU time: on a shared, overloaded machine the wall clock
mostly measures the scheduler, while CPU time still compares the work done). Calls alternate
between the implementations so that load changes hit both alike. "ours out=" dequantizes into a
reused buffer (no page faults on fresh memory); "ours" and gguf numpy both return fresh memory
(ours 2 MiB-aligned and advised for transparent huge pages, see `empty_f32`).
--compile adds the torch.compile kernels (`numerics/ggml/compiled.py`), fresh and into the reused buffer,
checked bit-equal with any fallback to the plain path made an error; "compile s" is the first call
(compiling, or loading inductor's on-disk cache, plus the bit check).
With --quantize, --compile adds the compiled quantizers (`numerics/ggml/compiled_quantize.py`: the
scale searches torch.compile'd), checked byte-equal to libggml's with any fallback made an error;
"compile s" is the first call (compiling or loading inductor's cache, plus the bit check).
With --quantize, --native adds the native C quantizers (`numerics/ggml/native.py`, preferred by
--compile; here --compile's column runs with them off), checked the same way; its first call
builds or loads the library and runs the bit check. Q2_K, Q3_K, IQ4_NL and IQ4_XS run native or
plain, never torch.compile'd ("native or plain only" in the compiled column).
--quantize-only skips the dequantizer table.
--ct adds compressed-tensors' formats: our plain-torch dequantizers vs compressed-tensors'
`decompress` on the same tensors (bit-equal, checked), both returning fresh bf16 tensors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import gguf
import numpy as np
import torch

from gemmaquant.numerics import compiling
from gemmaquant.numerics.ggml import compiled_quantize, native, registry
from gemmaquant.numerics.ggml.dequantize import dequantize
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.registry import REQUIRES_IMATRIX
from gemmaquant.numerics.ggml.types import GGMLType, ggml_type

FUSED = {t for t, k in registry.TYPES.items() if k.fused is not None}  # the types with a compiled kernel

TYPES = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
         GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.F16, GGMLType.BF16]  # fmt: skip
NEW_TYPES = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS, GGMLType.TQ1_0, GGMLType.TQ2_0,
             GGMLType.IQ3_S, GGMLType.IQ3_XXS, GGMLType.IQ2_S, GGMLType.IQ2_XS, GGMLType.IQ2_XXS,
             GGMLType.IQ1_S, GGMLType.IQ1_M]  # fmt: skip


def _medians(fns: list, repeats: int) -> list[tuple[float, float]]:
    """(median wall seconds, median CPU seconds) per function, calls interleaved."""
    for fn in fns:
        fn()  # warm-up
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[i].append(time.perf_counter() - w0)
            cpu[i].append(time.process_time() - c0)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def _libggml():
    """llama.cpp's ggml_quantize_chunk via the test binding, or None when llama_cpp is absent."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    try:
        from tests.numerics.ggml.libggml import _load, ggml_quantize  # noqa: PLC0415
    except ImportError:
        return None
    return ggml_quantize if _load()[0] is not None else None


def bench_dequant(args: argparse.Namespace, types: list[GGMLType]) -> None:
    n = args.rows * args.cols
    print(f"\nDequantize {args.rows}x{args.cols} ({n / 1e6:.1f} M values), M values/s, wall | cpu:\n")
    head = "| type | gguf numpy | ours | ours out= |"
    if args.compile:
        head += " compiled | compiled out= | compiled / numpy, fresh vs fresh (wall) | (cpu) | compile s |"
    else:
        head += " ours / numpy (wall) | ours / numpy (cpu) |"
    print(head)
    print("|---" + "|---:" * (head.count("|") - 2) + "|")
    shape = (args.rows, args.cols)
    buf = torch.empty(shape)
    for qtype in types:
        # Valid blocks from our quantizer on a 64-row slab, tiled to the full size.
        im = torch.rand(args.cols) + 0.1 if qtype in REQUIRES_IMATRIX else None
        data = quantize(torch.randn(64, args.cols) * 0.02, qtype, im).repeat(args.rows // 64, 1)
        data_np = data.numpy()
        gtype = gguf.GGMLQuantizationType(int(qtype))
        ref = gguf.quants.dequantize(data_np, gtype).astype(np.float32)
        fns = [
            lambda: gguf.quants.dequantize(data_np, gtype),
            lambda: dequantize(data, qtype, shape, compiled=False),
            lambda: dequantize(data, qtype, shape, out=buf, compiled=False),
        ]
        assert np.array_equal(fns[1]().numpy().view(np.uint32), ref.view(np.uint32))
        if args.compile and qtype in FUSED:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("error", compiling.CompiledDequantWarning)  # no silent plain path
                got = dequantize(data, qtype, shape, compiled=True)
            compile_s = time.perf_counter() - t0
            assert np.array_equal(got.numpy().view(np.uint32), ref.view(np.uint32))
            fns += [
                lambda: dequantize(data, qtype, shape, compiled=True),
                lambda: dequantize(data, qtype, shape, out=buf, compiled=True),
            ]
        (wn, cn), (wo, co), (wb, cb), *rest = _medians(fns, args.repeats)
        m = n / 1e6
        row = f"| {qtype.name} | {m / wn:.0f} \\| {m / cn:.0f} | {m / wo:.0f} \\| {m / co:.0f} | {m / wb:.0f} \\| {m / cb:.0f} |"
        if args.compile and qtype not in FUSED:
            row += " no compiled kernel | | | | |"
        elif args.compile:
            (wc, cc), (wcb, ccb) = rest
            row += (f" {m / wc:.0f} \\| {m / cc:.0f} | {m / wcb:.0f} \\| {m / ccb:.0f} | {wn / wc:.1f}x"
                    f" | {cn / cc:.1f}x | {compile_s:.1f} |")
        else:
            row += f" {wn / wo:.1f}x | {cn / co:.1f}x |"
        print(row)


def _quantize_with(native_on: bool):
    """quantize(compiled=True) with the native C searches on, or off (the torch.compile'd ones)."""
    def run(w, qtype, im):
        old = os.environ.get(native.ENV)
        os.environ[native.ENV] = "1" if native_on else "0"
        try:
            return quantize(w, qtype, im, compiled=True)
        finally:
            if old is None:
                del os.environ[native.ENV]
            else:
                os.environ[native.ENV] = old
    return run


def bench_quantize(args: argparse.Namespace, types: list[GGMLType]) -> None:
    ggml = _libggml()
    w = torch.randn(args.qrows, args.cols) * 0.02
    im = torch.rand(args.cols) * 3 if args.imatrix else None
    kind = "with an imatrix" if args.imatrix else "no imatrix"
    print(f"\nQuantize {args.qrows}x{args.cols} N(0, 0.02), {kind}, M values/s, wall | cpu:\n")
    # the optional paths: (column name, quantize function, the name compiled_types() gives it when it ran)
    paths = []
    if args.compile:
        paths.append(("compiled", _quantize_with(False), "quantize {}"))
    if args.native:
        paths.append(("native", _quantize_with(True), "quantize {} (native)"))
        try:
            native.library()
            print(f"native library: {native.built_isa}\n")
        except native.NativeError as e:
            print(f"native library unavailable: {e}\n")
    head = ["type", "ours"] + [f"ours {p[0]}" for p in paths] + ["llama.cpp C (1 thread)", "ours / C (cpu)"]
    head += [f"{p[0]} / C (cpu)" for p in paths] + [f"{p[0]} first call s" for p in paths]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    m = w.numel() / 1e6
    for qtype in types:
        if qtype in (GGMLType.F16, GGMLType.BF16):
            continue
        if im is None and qtype in REQUIRES_IMATRIX:
            print(f"| {qtype.name} | needs --imatrix |")
            continue
        fns = [lambda: quantize(w, qtype, im, compiled=False)]
        ran, first_s, got = [], [], []
        for _, fn, label in paths:
            if not (registry.TYPES[qtype].compiled_search or qtype in compiled_quantize.NATIVE_ONLY):
                ran.append(False)
                continue
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("error", compiling.CompiledDequantWarning)
                got.append(fn(w, qtype, im))
            first_s.append(time.perf_counter() - t0)
            ran.append(label.format(qtype.name) in compiling.compiled_types())  # a search ran this way
            if ran[-1]:
                fns.append(lambda fn=fn: fn(w, qtype, im))
        if ggml is not None:
            ref = ggml(w, qtype, im)
            assert torch.equal(quantize(w, qtype, im, compiled=False), ref), qtype
            assert all(torch.equal(g, ref) for g in got), qtype
            fns.append(lambda: ggml(w, qtype, im))
        times = _medians(fns, max(1, args.repeats // 2))
        (wo, co) = times[0]
        cols, c_col, ratio = [f"{m / wo:.1f} \\| {m / co:.1f}"], "n/a", "n/a"
        if ggml is not None:
            wc, cc = times[-1]
            c_col, ratio = f"{m / wc:.1f} \\| {m / cc:.1f}", f"{co / cc:.2f}x"
        mine, ratios, firsts, k = [], [], [], 1
        for i, did in enumerate(ran):
            if not did:
                native_only = paths[i][0] == "compiled" and qtype in compiled_quantize.NATIVE_ONLY
                mine.append("native or plain only" if native_only else "no search to compile")
                ratios.append("n/a")
                firsts.append("")
                continue
            wk, ck = times[k]
            k += 1
            mine.append(f"{m / wk:.1f} \\| {m / ck:.1f}")
            ratios.append(f"{ck / times[-1][1]:.2f}x" if ggml is not None else "n/a")
            firsts.append(f"{first_s[i]:.1f}")
        print("| " + " | ".join([qtype.name, *cols, *mine, c_col, ratio, *ratios, *firsts]) + " |")


def bench_ct(args: argparse.Namespace) -> None:
    from compressed_tensors.compressors.naive_quantized.base import (  # noqa: PLC0415
        FloatQuantizationCompressor, IntQuantizationCompressor)
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: PLC0415
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: PLC0415

    from gemmaquant.numerics.ct import dequantize as ct_dequantize  # noqa: PLC0415
    from gemmaquant.numerics.ct import quantize_fp8, quantize_int8, quantize_pack  # noqa: PLC0415

    w = (torch.randn(args.rows, args.cols) * 0.02).to(torch.bfloat16)
    cases = [  # (name, packed, our num_bits, ct compressor, ct quantization args)
        ("FP8 channel", quantize_fp8(w, "channel"), None, FloatQuantizationCompressor,
         dict(num_bits=8, type="float", strategy="channel")),
        ("FP8 tensor", quantize_fp8(w, "tensor"), None, FloatQuantizationCompressor,
         dict(num_bits=8, type="float", strategy="tensor")),
        ("INT8 channel", quantize_int8(w), None, IntQuantizationCompressor,
         dict(num_bits=8, type="int", strategy="channel")),
        ("INT4 g128 sym", quantize_pack(w, 4, group_size=128, symmetric=True), 4, PackedQuantizationCompressor,
         dict(num_bits=4, type="int", strategy="group", group_size=128)),
        ("INT4 g128 asym", quantize_pack(w, 4, group_size=128, symmetric=False), 4, PackedQuantizationCompressor,
         dict(num_bits=4, type="int", strategy="group", group_size=128, symmetric=False)),
    ]
    m = w.numel() / 1e6
    print(f"\ncompressed-tensors formats, {args.rows}x{args.cols} -> bf16, M values/s, wall | cpu:\n")
    if args.compile:
        print("| format | compressed-tensors | ours | ours compiled | ours / ct (cpu) | compiled / ct (cpu) |")
        print("|---|---:|---:|---:|---:|---:|")
    else:
        print("| format | compressed-tensors | ours | ours / ct (cpu) |")
        print("|---|---:|---:|---:|")
    for name, p, bits, comp, qa in cases:
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**qa))
        tensors = p.tensors()

        def theirs(comp=comp, tensors=tensors, scheme=scheme):
            return comp.decompress(tensors, scheme)["weight"]

        compiling.set_enabled(False)
        assert torch.equal(ct_dequantize(p, bits), theirs()), name
        fns = [theirs, lambda p=p, bits=bits: ct_dequantize(p, bits)]
        if args.compile:
            def ours_compiled(p=p, bits=bits):
                compiling.set_enabled(True)
                try:
                    return ct_dequantize(p, bits)
                finally:
                    compiling.set_enabled(False)

            with warnings.catch_warnings():
                warnings.simplefilter("error", compiling.CompiledDequantWarning)  # no silent plain path
                assert torch.equal(ours_compiled(), theirs()), name
            fns.append(ours_compiled)
        (wc, cc), (wo, co), *rest = _medians(fns, args.repeats)
        row = f"| {name} | {m / wc:.0f} \\| {m / cc:.0f} | {m / wo:.0f} \\| {m / co:.0f} |"
        if args.compile:
            (wk, ck), = rest
            row += f" {m / wk:.0f} \\| {m / ck:.0f} | {cc / co:.1f}x | {cc / ck:.1f}x |"
        else:
            row += f" {cc / co:.1f}x |"
        print(row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--types", default=",".join(t.name for t in TYPES))
    ap.add_argument("--quantize", action="store_true", help="also time the quantizers")
    ap.add_argument("--qrows", type=int, default=256)
    ap.add_argument("--quantize-only", action="store_true", help="only the quantizer table")
    ap.add_argument("--imatrix", action="store_true", help="quantize with a random importance matrix")
    ap.add_argument("--ct", action="store_true", help="also time compressed-tensors' formats")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile kernels (numerics/ggml/compiled.py, compiled_quantize.py)")
    ap.add_argument("--native", action="store_true", help="with --quantize: also time the native C searches (numerics/ggml/native.py)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    named = {"new": NEW_TYPES, "all": TYPES + NEW_TYPES}
    types = named.get(args.types) or [ggml_type(t) for t in args.types.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {load:.1f}")
    if not args.quantize_only:
        bench_dequant(args, types)
    if args.quantize or args.quantize_only:
        bench_quantize(args, types)
    if args.ct:
        bench_ct(args)


if __name__ == "__main__":
    main()
