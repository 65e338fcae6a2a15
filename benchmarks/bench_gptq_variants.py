"""Issue 21: variants of error-feedback rounding that were tried and not adopted, on the held-out proxy.

    python benchmarks/bench_gptq_variants.py --template LLAMA_IMX.gguf --heldout TEXT [--model DIR]
        [--calib FILE] [--layers 3 13] [--chunks 21] [--heldout-chunks 12] [--damp 0.3] [--json OUT]

The same proxy as bench_gptq_heldout.py: for each Linear of the chosen layers, with the type llama.cpp
gave it in --template, each variant's values are scored by the layer-output error on the inputs of
--heldout (another text than the calibration one), as a ratio to llama.cpp's bytes (its quantizer with the
calibration imatrix). Inputs from the float model. Variants (the library's is `ours`):

* `ours`             gemmaquant's rounding (calib/ggml_gptq.py): llama.cpp's scales, act-order, refit.
* `dynamic scales`   GPTQ's dynamic groups: columns in their natural order; each span of 128 columns (256
                     for super-block types) gets llama.cpp's scale search on the weights as the error
                     feedback has left them, then error-feedback codes inside, then the refit.
* `shrunk H`         H with its off-diagonal part scaled by 0.7 (toward llama.cpp's diagonal objective).
* `free sub-scales`  `ours`'s codes with every sub-block's scale (and min) solved by least squares, left
                     continuous: a bound on what refitting the integer sub-scales too could add.
* `second pass`      for the types whose codes round to the nearest stored value (K-quants, Q4_1/Q5_1):
                     `ours`, then error feedback again inside the refitted scales, then a refit again.
* `widened grid`     Q4_1/Q5_1: llama.cpp's (d, m) widened by a quarter step at each end before the
                     error feedback (room for the fed-forward errors at the block's extremes), then refit.
* `norm-weighted H`  for a Linear whose output an RMSNorm divides (Gemma 3's q/k norms per head, the
                     post-attention and post-feed-forward norms), each token weighted by 1/(mean(y²)+eps)
                     of its output y (per head for q/k): the error the norm passes on, to first order.

Each is scored against the plain held-out H, and for the norm-divided Linears also against the
norm-weighted held-out H (`normalized`), the error that reaches the residual stream.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench_gguf_optimized import calib_ids, tensor_types

NORMED = {"self_attn.q_proj": "head", "self_attn.k_proj": "head", "self_attn.o_proj": "row",
          "mlp.down_proj": "row"}


def collect(ckpt, ids, layers: list[int]) -> dict:
    """{Linear name: {W, H, Hw [heads, n, n], sum_sq, count}} from forward hooks on the float model."""
    import gemmaquant.calib.runner as runner
    from gemmaquant.calib.stats import INPUT_OF

    cfg = ckpt.config
    out: dict[str, dict] = {}
    load = runner.load_layer

    def hooked(ck, i, *a, **k):
        layer = load(ck, i, *a, **k)
        if i not in layers:
            return layer
        for sfx in INPUT_OF:
            mod = layer.get_submodule(sfx)
            d = out.setdefault(f"model.layers.{i}.{sfx}", {"W": mod.weight.detach().clone(), "count": 0})

            def hook(m, inp, y, d=d, sfx=sfx):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                y = y.reshape(x.shape[0], -1).double()
                if NORMED.get(sfx) == "head":
                    w = 1.0 / (y.view(x.shape[0], -1, cfg.head_dim).pow(2).mean(-1) + cfg.rms_norm_eps)
                elif NORMED.get(sfx) == "row":
                    w = 1.0 / (y.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
                else:
                    w = torch.ones(x.shape[0], 1, dtype=torch.float64)
                d["H"] = d.get("H", 0) + x.T @ x
                d["Hw"] = d.get("Hw", 0) + torch.einsum("th,ti,tj->hij", w, x, x)
                d["sum_sq"] = d.get("sum_sq", 0) + x.pow(2).sum(0)
                d["count"] += x.shape[0]
            mod.register_forward_hook(hook)
        return layer

    runner.load_layer = hooked
    try:
        runner.run_layers(ckpt, ids, kinds={"sum_sq"}, sequential=False, layers=range(0, max(layers) + 1))
    finally:
        runner.load_layer = load
    return out


def split_loss(W, V, Hs) -> float:
    """Σ over Hs [heads, n, n] of the loss of the rows of each head (rows split evenly)."""
    from gemmaquant.calib.ggml_gptq import layer_loss

    r = W.shape[0] // Hs.shape[0]
    return sum(layer_loss(W[k * r:(k + 1) * r], V[k * r:(k + 1) * r], Hs[k]) for k in range(Hs.shape[0]))


def dynamic_scales(W, H, qtype, imatrix, damp):
    from gemmaquant.calib.ggml_codes import SUB, pack_codes, sub_grid
    from gemmaquant.calib.ggml_gptq import hessian_factor, llama_rounding
    from gemmaquant.calib.threads import single_thread
    from gemmaquant.calib.ggml_refit import refit
    from gemmaquant.numerics.ggml.types import BLOCK

    rows, n = W.shape
    span, sub = max(128, BLOCK[qtype][0]), SUB[qtype]
    U = hessian_factor(H, damp=damp, act_order=False).U
    Wt = W.float().T.contiguous()
    codes = torch.empty(n, rows, dtype=torch.long)
    parts = []
    with single_thread():
        for i1 in range(0, n, span):
            i2 = min(i1 + span, n)
            W1 = Wt[i1:i2]
            r = llama_rounding(W1.T, qtype, imatrix[i1:i2])
            err1 = torch.empty_like(W1)
            for i in range(i2 - i1):
                q = r.decide(W1[i], i)
                codes[i1 + i] = q
                err = (W1[i] - r.grid.value(q, i // sub)) / U[i1 + i, i1 + i]
                W1[i + 1:] -= U[i1 + i, i1 + i + 1:i2, None] * err[None, :]
                err1[i] = err
            parts.append(r.data)
            if i2 < n:
                Wt[i2:] -= U[i1:i2, i2:].T @ err1
    codes = codes.T.contiguous()
    data = pack_codes(torch.cat(parts, dim=1), qtype, codes)
    with single_thread():
        data = refit(W, H, data, qtype, codes)
    return sub_grid(data, qtype, rows).values(codes)


def shrunk_h(W, H, qtype, imatrix, damp, keep=0.7):
    from gemmaquant.calib.ggml_calibrate import optimize_layer_tensor

    Hs = H * keep
    Hs.diagonal().copy_(H.diagonal())
    return optimize_layer_tensor(W, Hs, qtype, imatrix, damp=damp)[1]


def free_sub_scales(W, H, qtype, imatrix, damp):
    """`ours`'s codes; per sub-block scale (and offset) by least squares, continuous."""
    from gemmaquant.calib.ggml_codes import SUB
    from gemmaquant.calib.ggml_gptq import gptq_codes, hessian_factor, llama_rounding

    rows, n = W.shape
    sub = SUB[qtype]
    r = llama_rounding(W, qtype, imatrix)
    codes = gptq_codes(W, hessian_factor(H, damp=damp), r)
    nb = n // sub
    lv = r.grid.level(codes).double().view(rows, nb, sub)
    basis = [lv] if r.grid.B is None else [lv, torch.ones_like(lv)]
    Hd = H.double().view(n, nb, sub)
    WH = W.double() @ H.double()
    out = torch.empty(rows, n, dtype=torch.float64)
    K = len(basis)
    for r0 in range(0, rows, 32):
        B = torch.stack([b[r0:r0 + 32] for b in basis], 2)  # [r, nb, K, sub]
        T = torch.einsum("nbi,rbki->rnbk", Hd, B).reshape(B.shape[0], nb, sub, nb * K)
        A = torch.einsum("rbki,rbiq->rbkq", B, T).reshape(B.shape[0], nb * K, nb * K)
        g = (B * WH[r0:r0 + 32].view(-1, nb, 1, sub)).sum(-1).reshape(B.shape[0], nb * K)
        lam = 1e-9 * A.diagonal(dim1=1, dim2=2).mean(-1)
        f = torch.linalg.solve(A + lam[:, None, None] * torch.eye(nb * K, dtype=torch.float64), g)
        out[r0:r0 + 32] = (B * f.view(-1, nb, K, 1)).sum(2).reshape(-1, n)
    return out.float()


def second_pass(W, H, qtype, imatrix, damp):
    from dataclasses import replace

    from gemmaquant.calib.ggml_codes import pack_codes, sub_grid
    from gemmaquant.calib.ggml_gptq import gptq_codes, hessian_factor, llama_rounding, optimize_tensor
    from gemmaquant.calib.ggml_refit import refit

    r = llama_rounding(W, qtype, imatrix)
    if r.kind not in ("div", "nearest"):
        return None
    f = hessian_factor(H, damp=damp)
    data = optimize_tensor(W, H, qtype, imatrix, factor=f).data
    g = sub_grid(data, qtype, W.shape[0])
    codes = gptq_codes(W, f, replace(r, data=data, grid=g, keep=g.A == 0))
    data = refit(W, H, pack_codes(data, qtype, codes), qtype, codes)
    return sub_grid(data, qtype, W.shape[0]).values(codes)


def widened_grid(W, H, qtype, imatrix, damp, room=0.25):
    from dataclasses import replace

    from gemmaquant.calib.ggml_codes import RANGE, pack_codes, sub_grid
    from gemmaquant.calib.ggml_gptq import gptq_codes, hessian_factor, llama_rounding
    from gemmaquant.calib.ggml_refit import refit
    from gemmaquant.numerics.ggml.types import BLOCK, GGMLType

    if qtype not in (GGMLType.Q4_1, GGMLType.Q5_1):
        return None
    r = llama_rounding(W, qtype, imatrix)
    hi = RANGE[qtype][1]
    d = r.grid.A * (hi + 2 * room) / hi  # value = d·q + m: d and m are the block's two fp16 fields
    m = r.grid.B - room * d
    b = r.data.reshape(-1, BLOCK[qtype][1]).clone()
    for at, v in ((0, d), (2, m)):
        b[:, at:at + 2] = v.reshape(-1, 1).to(torch.float16).view(torch.uint8).view(-1, 2)
    data = b.view(W.shape[0], -1)
    g = sub_grid(data, qtype, W.shape[0])
    codes = gptq_codes(W, hessian_factor(H, damp=damp), replace(r, data=data, grid=g, keep=g.A == 0))
    data = refit(W, H, pack_codes(data, qtype, codes), qtype, codes)
    return sub_grid(data, qtype, W.shape[0]).values(codes)


def norm_weighted(W, Hw, qtype, imatrix, damp, H):
    """Per head (rows split evenly), error feedback on the norm-weighted H scaled to H's trace."""
    from gemmaquant.calib.ggml_calibrate import optimize_layer_tensor

    h = Hw.shape[0]
    r = W.shape[0] // h
    scale = [float(H.diagonal().sum() / Hw[k].diagonal().sum()) for k in range(h)]
    return torch.cat([optimize_layer_tensor(W[k * r:(k + 1) * r], (Hw[k] * scale[k]).float(), qtype, imatrix,
                                            damp=damp)[1] for k in range(h)])


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
    ap.add_argument("--damp", type=float, default=None, help="default: the library's")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from gemmaquant.calib.ggml_calibrate import imatrix_of, optimize_layer_tensor
    from gemmaquant.calib.ggml_gptq import DAMP, layer_loss
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.formats.demo import ensure_demo_checkpoint
    from gemmaquant.formats.gguf.names import gguf_name
    from gemmaquant.numerics.ggml.dequantize import dequantize
    from gemmaquant.numerics.ggml.quantize import quantize

    damp = DAMP if args.damp is None else args.damp
    torch.set_num_threads(2)
    ckpt = Checkpoint(args.model or ensure_demo_checkpoint())
    train = collect(ckpt, calib_ids(ckpt, args.calib, args.ctx)[:args.chunks], args.layers)
    test = collect(ckpt, calib_ids(ckpt, args.heldout, args.ctx)[:args.heldout_chunks], args.layers)
    types = {n: t for n, (t, _) in tensor_types(args.template).items()}
    rows = []
    for name, d in train.items():
        qtype = types[gguf_name(name + ".weight", ckpt.config.generation)]
        W = d["W"].to(torch.bfloat16).float()
        H = d["H"].float()
        im = imatrix_of(d["sum_sq"], d["count"])
        ref = dequantize(quantize(W, qtype, im), qtype, tuple(W.shape))
        Ht, Hwt = test[name]["H"], test[name]["Hw"]
        base, base_n = layer_loss(W, ref, Ht), split_loss(W, ref, Hwt)
        variants = {
            "ours": optimize_layer_tensor(W, H, qtype, im, damp=damp)[1],
            "dynamic scales": dynamic_scales(W, H, qtype, im, damp),
            "shrunk H": shrunk_h(W, H, qtype, im, damp),
            "free sub-scales": free_sub_scales(W, H, qtype, im, damp),
            "second pass": second_pass(W, H, qtype, im, damp),
            "widened grid": widened_grid(W, H, qtype, im, damp),
        }
        variants = {k: v for k, v in variants.items() if v is not None}
        if name.split(".", 3)[3] in NORMED:
            variants["norm-weighted H"] = norm_weighted(W, d["Hw"], qtype, im, damp, d["H"])
        row = {"tensor": name, "type": qtype.name, "heldout": {}, "normalized": {}}
        for k, v in variants.items():
            row["heldout"][k] = layer_loss(W, v, Ht) / base
            if name.split(".", 3)[3] in NORMED:
                row["normalized"][k] = split_loss(W, v, Hwt) / base_n
        rows.append(row)
        print(name, qtype.name, {k: round(v, 3) for k, v in row["heldout"].items()},
              {k: round(v, 3) for k, v in row["normalized"].items()}, flush=True)

    def gm(rs, k, key="heldout"):  # geometric mean of variant k's ratio and `ours`'s on the rows k applies to
        xs = [(r[key][k], r[key]["ours"]) for r in rs if k in r[key]]
        if not xs:
            return "–"
        a, b = (float(np.exp(np.mean(np.log(v)))) for v in zip(*xs))
        return f"{a:.3f} ({b:.3f}; {len(xs)})"

    names = list(dict.fromkeys(k for r in rows for k in r["heldout"]))
    normed = [r for r in rows if r["normalized"]]
    print(f"\nheld-out layer-output error / llama.cpp's bytes, geometric mean over the Linears a variant applies "
          f"to (in brackets: `ours` on the same Linears; their number), layers {args.layers}, damp {damp}\n")
    print("| variant | all Linears | norm-divided Linears | norm-divided, normalized |\n|---|---:|---:|---:|")
    for k in names:
        print(f"| {k} | {gm(rows, k)} | {gm(normed, k)} | {gm(normed, k, 'normalized')} |")
    if args.json:
        args.json.write_text(json.dumps({"heldout": args.heldout.name, "damp": damp, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
