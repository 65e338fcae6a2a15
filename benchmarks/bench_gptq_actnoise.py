"""Issue 21: can the codes make up for llama.cpp's 8-bit rounding of the activations? (No: a variant not adopted.)

    python benchmarks/bench_gptq_actnoise.py --template LLAMA_IMX.gguf --heldout TEXT [--model DIR]
        [--calib FILE] [--layers 3 13] [--chunks 21] [--heldout-chunks 12] [--json OUT]

llama.cpp's CPU backend rounds a quantized dot product's activations to 8 bits: Q8_0 blocks of 32 for
Q4_0/Q5_0/Q8_0/IQ4_NL weights, Q8_1 for Q4_1/Q5_1, Q8_K blocks of 256 for the K- and IQ-quants. At q6_k that
rounding, not the weights, is most of the file's KL. If the rounding error e is independent of x with
diagonal covariance D (measured on the calibration inputs), the best weights for E||V(x + e) − Wx||² are
W* = W·H·(H + D)⁻¹ rounded with error feedback on H + D (H = XᵀX): a shrinkage in the directions the
noise swamps. Variants, each scored on the held-out text's inputs of each Linear of --layers (type from
--template), as a ratio to llama.cpp's bytes (its quantizer, calibration imatrix):

* `full`: ||q8(X) Vᵀ − X Wᵀ||², the layer output as llama.cpp computes it (activations rounded);
* `weights`: ||X (V − W)ᵀ||², the weights' part alone.

Rows: `float weights` (V = W: what the activation rounding alone costs), `ours` (the library),
`noise-aware` (W*, H + D), `noise-aware, ridge 0.1` (W* with 0.1·mean diag H added to both H's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench_gguf_optimized import calib_ids, tensor_types
from gemmaquant.model.qlinear import act_block, ggml_act_quant


def collect_inputs(ckpt, ids, layers: list[int]) -> dict:
    """{Linear name: {W, X [tokens, in]}} from forward hooks on the float model."""
    import gemmaquant.calib.runner as runner
    from gemmaquant.calib.stats import INPUT_OF

    out: dict[str, dict] = {}
    load = runner.load_layer

    def hooked(ck, i, *a, **k):
        layer = load(ck, i, *a, **k)
        if i in layers:
            for sfx in INPUT_OF:
                mod = layer.get_submodule(sfx)
                d = out.setdefault(f"model.layers.{i}.{sfx}", {"W": mod.weight.detach().clone(), "X": []})
                mod.register_forward_hook(lambda m, inp, y, d=d: d["X"].append(
                    inp[0].reshape(-1, inp[0].shape[-1]).float().clone()))
        return layer

    runner.load_layer = hooked
    try:
        runner.run_layers(ckpt, ids, kinds={"sum_sq"}, sequential=False, layers=range(0, max(layers) + 1))
    finally:
        runner.load_layer = load
    for d in out.values():
        d["X"] = torch.cat(d["X"])
    return out


def noise_aware(W, H, D, qtype, count, ridge: float):
    from gemmaquant.calib.ggml_calibrate import imatrix_of, optimize_layer_tensor
    from gemmaquant.calib.ggml_gptq import DAMP

    H = H.double().clone()
    dead = H.diagonal() == 0  # inputs never seen: H_jj = 1, as the factor takes them
    H[dead, dead] = 1.0
    reg = ridge * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hd = H + torch.diag(D) + reg
    Ws = torch.linalg.solve(Hd, (W.double() @ (H + reg)).T).T  # W (H + reg)(H + D + reg)⁻¹, symmetric
    return optimize_layer_tensor(Ws.float(), Hd.float(), qtype, imatrix_of(Hd.diagonal(), count), damp=DAMP)[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--template", required=True, type=Path)
    ap.add_argument("--heldout", required=True, type=Path)
    ap.add_argument("--calib", type=Path, default=None, help="default: gemmaquant's built-in calibration text")
    ap.add_argument("--model", type=Path, help="HF checkpoint directory (default: the demo model)")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 13])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=21)
    ap.add_argument("--heldout-chunks", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from gemmaquant.calib.ggml_calibrate import imatrix_of, optimize_layer_tensor
    from gemmaquant.calib.ggml_gptq import DAMP
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.formats.demo import ensure_demo_checkpoint
    from gemmaquant.formats.gguf.names import gguf_name
    from gemmaquant.numerics.ggml.dequantize import dequantize
    from gemmaquant.numerics.ggml.quantize import quantize

    torch.set_num_threads(2)
    ckpt = Checkpoint(args.model or ensure_demo_checkpoint())
    train = collect_inputs(ckpt, calib_ids(ckpt, args.calib, args.ctx)[:args.chunks], args.layers)
    test = collect_inputs(ckpt, calib_ids(ckpt, args.heldout, args.ctx)[:args.heldout_chunks], args.layers)
    types = {n: t for n, (t, _) in tensor_types(args.template).items()}
    rows = []
    for name, d in train.items():
        qtype = types[gguf_name(name + ".weight", ckpt.config.generation)]
        kind = f"blocks of {act_block(qtype)}"  # llama.cpp's CPU rounding of this product's input
        W = d["W"].to(torch.bfloat16).float()
        X, Xt = d["X"].double(), test[name]["X"]
        H = X.T @ X
        E = ggml_act_quant(X.float(), qtype).double() - X
        D = (E * E).sum(0)
        im = imatrix_of((X * X).sum(0), X.shape[0])
        Yt, Xq = Xt.double() @ W.double().T, ggml_act_quant(Xt, qtype).double()

        def score(V):
            V = V.double()
            return ((Xq @ V.T - Yt) ** 2).sum().item(), ((Xt.double() @ (V - W.double()).T) ** 2).sum().item()

        base = score(dequantize(quantize(W, qtype, im), qtype, tuple(W.shape)))
        variants = {"float weights": W,
                    "ours": optimize_layer_tensor(W, H.float(), qtype, im, damp=DAMP)[1],
                    "noise-aware": noise_aware(W, H, D, qtype, X.shape[0], 0.0),
                    "noise-aware, ridge 0.1": noise_aware(W, H, D, qtype, X.shape[0], 0.1)}
        row = {"tensor": name, "type": qtype.name, "activations": kind,
               "noise/signal": float((D / H.diagonal().clamp(min=1e-30)).median())}
        for k, v in variants.items():
            f, w = score(v)
            row[k] = {"full": f / base[0], "weights": w / base[1]}
        rows.append(row)
        print(name, qtype.name, kind, {k: (round(row[k]["full"], 3), round(row[k]["weights"], 3)) for k in variants},
              flush=True)

    print(f"\nheld-out layer-output error / llama.cpp's bytes, geometric mean over {len(rows)} Linears, "
          f"layers {args.layers}\n\n| variant | full (activations rounded) | weights alone |\n|---|---:|---:|")
    for k in ("float weights", "ours", "noise-aware", "noise-aware, ridge 0.1"):
        g = [[r[k][m] for r in rows] for m in ("full", "weights")]
        g = [f"{np.exp(np.mean(np.log(v))):.3f}" if min(v) > 0 else "0" for v in g]  # float weights: no weight error
        print(f"| {k} | {g[0]} | {g[1]} |")
    if args.json:
        args.json.write_text(json.dumps({"heldout": args.heldout.name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
