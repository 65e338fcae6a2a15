"""Issue 21, the cheap proxy: error-feedback rounding of real demo tensors judged on inputs it never saw.

    python benchmarks/bench_gptq_heldout.py --template LLAMA_IMX.gguf --heldout TEXT
        [--calib FILE] [--layers 7 13] [--damp 0.01 0.1 0.3] [--chunks 21] [--heldout-chunks 12] [--json OUT]

For each Linear of the chosen decoder layers, with the type llama.cpp gave it in --template (e.g.
llama-quantize's IQ4_XS file: its 640-column tensors fall back to IQ4_NL and Q5_1), the bytes of
`optimize_layer_tensor` at each damping are scored by the layer-output error ||X(W − Ŵ)ᵀ||² on the
calibration inputs X (in-sample) and on the inputs of --heldout (another text), each as a ratio to
llama.cpp's own bytes (llama.cpp's quantizer with the calibration imatrix). Inputs come from the float
model (not the sequentially quantized one): a proxy, the KL of bench_gguf_optimized.py decides.
--heldout must be neither the calibration text nor the text bench_gguf_optimized.py scores KL on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench_gguf_optimized import calib_ids, tensor_types


def collect(ckpt, ids, layers: list[int]) -> dict:
    """{Linear name: (XᵀX, Σx², count)} for the Linears of `layers`, and the float weights."""
    from gemmaquant.calib.runner import run_layers
    from gemmaquant.calib.stats import INPUT_OF

    stats, weights = {}, {}

    def on_layer(i, layer, st):
        if i in layers:
            for sfx, src in INPUT_OF.items():
                s = st[f"model.layers.{i}.{src}"]
                stats[f"model.layers.{i}.{sfx}"] = (s.xtx.double().clone(), s.sum_sq.clone(), s.count)
                weights[f"model.layers.{i}.{sfx}"] = layer.get_submodule(sfx).weight.detach().clone()

    run_layers(ckpt, ids, kinds={"xtx", "sum_sq"}, on_layer=on_layer, sequential=False,
               layers=range(0, max(layers) + 1))
    return {"stats": stats, "weights": weights}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--template", required=True, type=Path, help="llama.cpp's GGUF whose per-tensor types to use")
    ap.add_argument("--heldout", required=True, type=Path)
    ap.add_argument("--calib", type=Path, default=None, help="default: gemmaquant's built-in calibration text")
    ap.add_argument("--model", type=Path, help="HF checkpoint directory (default: the demo model)")
    ap.add_argument("--layers", type=int, nargs="+", default=[7, 13])
    ap.add_argument("--damp", type=float, nargs="+", default=[0.01, 0.1, 0.3])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=21, help="calibration chunks (llama-imatrix's chunking)")
    ap.add_argument("--heldout-chunks", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from gemmaquant.calib.ggml_calibrate import imatrix_of, optimize_layer_tensor
    from gemmaquant.calib.ggml_gptq import layer_loss
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.formats.demo import ensure_demo_checkpoint
    from gemmaquant.formats.gguf.names import gguf_name
    from gemmaquant.numerics.ggml.dequantize import dequantize
    from gemmaquant.numerics.ggml.quantize import quantize

    torch.set_num_threads(1)
    ckpt = Checkpoint(args.model or ensure_demo_checkpoint())
    train = collect(ckpt, calib_ids(ckpt, args.calib, args.ctx)[:args.chunks], args.layers)
    test = collect(ckpt, calib_ids(ckpt, args.heldout, args.ctx)[:args.heldout_chunks], args.layers)["stats"]
    types = {n: t for n, (t, _) in tensor_types(args.template).items()}
    gen = ckpt.config.generation
    rows = []
    for name, W in train["weights"].items():
        H, ss, cnt = train["stats"][name]
        Ht = test[name][0]
        qtype = types[gguf_name(name + ".weight", gen)]
        im = imatrix_of(ss, cnt)
        Wb = W.to(torch.bfloat16).float()
        ref = dequantize(quantize(Wb, qtype, im), qtype, tuple(Wb.shape))
        base = layer_loss(Wb, ref, H), layer_loss(Wb, ref, Ht)
        row = {"tensor": name, "type": qtype.name, "ratios": {}}
        for damp in args.damp:
            t0 = time.perf_counter()
            _, vals, _, _, _ = optimize_layer_tensor(W, H, qtype, im, damp=damp)
            row["ratios"][damp] = {"in_sample": layer_loss(Wb, vals, H) / base[0],
                                   "heldout": layer_loss(Wb, vals, Ht) / base[1], "s": time.perf_counter() - t0}
        rows.append(row)
        print(name, qtype.name, {d: f"{r['heldout']:.3f} (in-sample {r['in_sample']:.3f})"
                                 for d, r in row["ratios"].items()}, flush=True)

    def gm(xs):
        return float(np.exp(np.mean(np.log(xs))))

    print(f"\nlayer-output error / llama.cpp's bytes, geometric mean over {len(rows)} tensors of layers "
          f"{args.layers} ({args.template.name}'s types)\n")
    print("| damp | held-out | in-sample |\n|---:|---:|---:|")
    for damp in args.damp:
        print(f"| {damp} | {gm([r['ratios'][damp]['heldout'] for r in rows]):.3f} | "
              f"{gm([r['ratios'][damp]['in_sample'] for r in rows]):.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"heldout": args.heldout.name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
