"""Quality of the calibrated algorithms on the demo model (Gemma 3 270M) vs its bf16 weights.

    OMP_NUM_THREADS=1 python benchmarks/bench_calib_quality.py [--model DIR] [--calib-samples 32] [--calib-len 256]

(OMP_NUM_THREADS=1 on a shared 2-core machine: GPTQ's per-column loop is thousands of tiny ops, and with
two contended OpenMP threads it ran several times slower than with one.)

Each variant's weights are replaced by their dequantized values in our forward pass (fake-quant); the
W8A8 int8 variants also fake-quantize every Linear input per token, symmetric int8, as vLLM computes
dynamic per-token activations (scale = absmax/127, round to nearest). Compute is float32 throughout,
so the differences come from quantization only. Metrics over /work/shared/data/dev-eval.txt windows:
mean KL(bf16 ‖ quantized) per token and top-1 agreement. Calibration uses the packaged default text.
Targets: int8 SmoothQuant KL ≤ ½ int8 RTN's; w4a16 GPTQ/AWQ KL ≤ ½ RTN's and top-1 ≥ 0.8.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gemmaquant.calib import calibrate
from gemmaquant.calib.data import calibration_batches, load_tokenizer_for, read_text
from gemmaquant.calib.intq import rtn
from gemmaquant.checkpoint import Checkpoint
from gemmaquant.loading import load_model

EVAL_TEXT = Path("/work/shared/data/dev-eval.txt")


def act_int8_hooks(model):
    """Per-token symmetric int8 fake-quant of every Linear input (vLLM's dynamic W8A8 activations)."""
    def q(_m, args):
        x = args[0]
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0
        return (torch.clamp(torch.round(x / s), -128, 127) * s,)
    return [m.register_forward_pre_hook(q) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def eval_windows(tok, n: int, length: int, bos: int) -> torch.Tensor:
    text = read_text(EVAL_TEXT)
    try:
        ids = list(tok.encode(text, add_bos=False))
    except TypeError:
        ids = tok.encode(text, add_special_tokens=False).ids
    span = length - 1
    step = max(span, (len(ids) - span) // n)
    rows = [[bos] + ids[i * step:i * step + span] for i in range(n)]
    return torch.tensor(rows)


@torch.no_grad()
def final_logprobs(model, ids) -> list[torch.Tensor]:
    return [F.log_softmax(model(ids[i:i + 1])[0].float(), -1) for i in range(ids.shape[0])]


@torch.no_grad()
def compare(model, ids, ref_lp) -> tuple[float, float]:
    kl, agree, n = 0.0, 0, 0
    for i in range(ids.shape[0]):
        lp = F.log_softmax(model(ids[i:i + 1])[0].float(), -1)
        r = ref_lp[i].float()
        kl += (r.exp() * (r - lp)).sum().item()
        agree += (r.argmax(-1) == lp.argmax(-1)).sum().item()
        n += lp.shape[0]
    return kl / n, agree / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="HF bf16 Gemma dir (default: the demo model)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.8])
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    args = ap.parse_args()
    if args.model is None:
        from gemmaquant.demo import ensure_demo_checkpoint
        args.model = ensure_demo_checkpoint()
    ck = Checkpoint(args.model)
    tok = load_tokenizer_for(ck.path)
    bos = ck.config.bos_token_id or 2
    calib = calibration_batches(tok, None, args.calib_samples, args.calib_len, bos_id=bos)
    ev = eval_windows(tok, args.eval_samples, args.eval_len, bos)
    model = load_model(ck, torch.float32)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "layers" in n}
    ref_lp = [lp.half() for lp in final_logprobs(model, ev)]

    def set_weights(quantized=None, overrides=None, fn=None):
        model.load_state_dict(original, strict=False)
        sd = {}
        for n, p in original.items():
            if fn is not None and p.dim() == 2:
                sd[n] = fn(p)
        for n, q in (quantized or {}).items():
            sd[n + ".weight"] = q.dequantize()
        for n, t in (overrides or {}).items():
            sd[n] = t.float()
        model.load_state_dict(sd, strict=False)

    variants = {
        "int8 W8A8 rtn": dict(fn=lambda w: rtn(w, 8, None, True).dequantize(), act=True),
        **{f"int8 W8A8 smoothquant a={a}": dict(scheme="int8", algorithm="smoothquant", alpha=a, act=True)
           for a in args.alpha},
        **{f"int8 W8A8 smoothquant+gptq a={a}": dict(scheme="int8", algorithm="smoothquant+gptq", alpha=a,
                                                      act=True) for a in args.alpha},
        "w4a16 rtn": dict(fn=lambda w: rtn(w, 4, 128, True).dequantize()),
        "w4a16 rtn mse": dict(fn=lambda w: rtn(w, 4, 128, True, mse=True).dequantize()),
        # "gptq" is the default: clip search + scale refit (calibrate's gptq_mse / gptq_refit)
        "w4a16 gptq plain": dict(scheme="w4a16", algorithm="gptq", kw=dict(gptq_mse=False, gptq_refit=False)),
        "w4a16 gptq mse": dict(scheme="w4a16", algorithm="gptq", kw=dict(gptq_refit=False)),
        "w4a16 gptq refit": dict(scheme="w4a16", algorithm="gptq", kw=dict(gptq_mse=False)),
        "w4a16 gptq": dict(scheme="w4a16", algorithm="gptq"),
        "w4a16 gptq damp 0.1": dict(scheme="w4a16", algorithm="gptq", kw=dict(damp=0.1)),
        "w4a16 gptq no act-order": dict(scheme="w4a16", algorithm="gptq", kw=dict(act_order=False)),
        "w4a16 gptq float-target": dict(scheme="w4a16", algorithm="gptq", kw=dict(float_target=True)),
        "w4a16 awq": dict(scheme="w4a16", algorithm="awq"),
        "w4a16 awq+gptq": dict(scheme="w4a16", algorithm="awq+gptq"),
        "w4a16-asym rtn": dict(fn=lambda w: rtn(w, 4, 128, False).dequantize()),
        "w4a16-asym gptq": dict(scheme="w4a16-asym", algorithm="gptq"),
    }
    print(f"model {ck.path.name}; calibration {args.calib_samples}x{args.calib_len} tokens of the default "
          f"text; eval {args.eval_samples}x{args.eval_len} tokens of {EVAL_TEXT.name}", flush=True)
    print(f"{'variant':34s} {'KL':>9s} {'top-1':>7s} {'calib s':>8s}", flush=True)
    for name, v in variants.items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        if "scheme" in v:
            res = calibrate(ck, v["scheme"], algorithm=v["algorithm"], ids=calib, alpha=v.get("alpha", 0.5),
                            **v.get("kw", {}))
            set_weights(res.quantized, res.overrides)
        else:
            set_weights(fn=v["fn"])
        dt = time.time() - t0
        hooks = act_int8_hooks(model) if v.get("act") else []
        kl, top1 = compare(model, ev, ref_lp)
        for h in hooks:
            h.remove()
        print(f"{name:34s} {kl:9.4f} {top1:7.3f} {dt:8.1f}", flush=True)


if __name__ == "__main__":
    main()
