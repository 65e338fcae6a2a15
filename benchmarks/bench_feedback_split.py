"""Issue 21: how much better than llama.cpp's rounding error-feedback codes look on the tokens they were
fitted on, and on others: why the size budget scores `--algorithm gptq` codes on held-out windows.

    python benchmarks/bench_feedback_split.py --model /tmp/offgrid [--layers 3 13] [--windows 8]

The sensitivity pass of a size budget sees few tokens (the CLI's first 8 calibration windows of 512,
`export/gguf/optimized.SENSITIVITY_SAMPLES`). For every Linear of the chosen layers (float model, the
CLI's windows) and every budget type, it prints the geometric mean over Linears of
||X(W − Ŵ_fb)ᵀ||² / ||X(W − Ŵ_llama)ᵀ||², Ŵ_fb the error-feedback codes
(`calib/ggml_calibrate.optimize_layer_tensor`), Ŵ_llama llama.cpp's rounding with the same imatrix:
* fitted and scored on all windows (what scoring in-sample would use);
* fitted on the even windows, scored on them;
* fitted on the even windows, scored on the odd ones (what `sensitivity.measure_sensitivity(feedback=True)`
  uses), and that with llama.cpp's CPU rounding of the input added to both errors.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

from gemmaquant.calib.ggml_calibrate import imatrix_of, optimize_layer_tensor
from gemmaquant.calib.sensitivity import BUDGET_TYPES, candidates
from gemmaquant.calib.sensitivity_parts import InputForms, quantized, sampled_rows
from gemmaquant.export.gguf.optimized import SENSITIVITY_SAMPLES, calibration_ids
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.model.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 13])
    ap.add_argument("--windows", type=int, default=SENSITIVITY_SAMPLES)
    ap.add_argument("--rows", type=int, default=256, help="rows of each weight sampled (as the sensitivity does)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    ck = Checkpoint(args.model)
    ids = calibration_ids(ck, SimpleNamespace(calib=None, calib_samples=128, calib_len=512))[:args.windows]
    model = load_model(ck)
    forms = {i: InputForms(model.layers[i], ids.numel(), activations=True, split=True) for i in args.layers}
    sq: dict[tuple, torch.Tensor] = {}
    hooks = []
    for i, f in forms.items():
        for sfx, src in f.groups.items():
            if sfx == src:
                hooks.append(model.layers[i].get_submodule(src).register_forward_pre_hook(
                    lambda _m, a, k=(i, src): sq.__setitem__(k, sq.get(k, 0) + a[0].float().pow(2).sum((0, 1)))))
    with torch.no_grad():
        for b in range(0, len(ids), 4):
            model(ids[b:b + 4], logits_from=ids.shape[1] - 1)
    for h in hooks:
        h.remove()
    for f in forms.values():
        f.remove()
    ratios: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for i, f in forms.items():
        for sfx, src in f.groups.items():
            W = model.layers[i].get_submodule(sfx).weight.detach()
            W = W[sampled_rows(W.shape[0], args.rows)].to(torch.bfloat16).float()
            imat = imatrix_of(sq[(i, src)], ids.numel())
            whole, fit = {}, {}
            for t in candidates(W.shape[1], BUDGET_TYPES):
                Wq = quantized(W, t, imat)
                Wa = optimize_layer_tensor(W, f.hessian(sfx), t, imat, factors=whole)[1]
                Wf = optimize_layer_tensor(W, f.hessian(sfx, "fit"), t, imat, factors=fit)[1]
                D, Da, Df = ((W - V).double() for V in (Wq, Wa, Wf))
                r = ratios[t.name]
                r["in-sample, all windows"].append(f.error(sfx, Da) / f.error(sfx, D))
                r["in-sample, even windows"].append(f.error(sfx, Df, "fit") / f.error(sfx, D, "fit"))
                held = f.error(sfx, Df, "held") / f.error(sfx, D, "held")
                r["held out (odd windows)"].append(held)
                e = f.error(sfx, D)
                r["held out, with the input's rounding"].append(
                    (e * held + f.act_error(sfx, Wf, t)) / (e + f.act_error(sfx, Wq, t)))
            print(f"  layer {i} {sfx}", flush=True)
    cols = list(next(iter(ratios.values())))
    print(f"\n{len(ids)} windows x {ids.shape[1]} tokens, layers {args.layers}, {args.rows} rows per weight; "
          f"error-feedback / llama.cpp layer-output error, geometric mean over Linears ({time.perf_counter() - t0:.0f} s)\n")
    print("| type | Linears | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for t, r in ratios.items():
        gm = [math.exp(sum(map(math.log, r[c])) / len(r[c])) for c in cols]
        print(f"| {t} | {len(r[cols[0]])} | " + " | ".join(f"{v:.3f}" for v in gm) + " |")


if __name__ == "__main__":
    main()
