"""Quality of the calibrated algorithms on the demo model (Gemma 3 270M) vs its bf16 weights.

    OMP_NUM_THREADS=1 python benchmarks/bench_calib_quality.py [--model DIR] [--calib-samples 32] [--calib-len 256]
        [--calib FILE] [--eval-text FILE] [--eval-samples 8] [--damp 0.01] [--only VARIANT...] [--json FILE]

(OMP_NUM_THREADS=1 on a shared 2-core machine: GPTQ's per-column loop is thousands of tiny ops, and with
two contended OpenMP threads it ran several times slower than with one.)

Each variant's weights are replaced by their dequantized values in our forward pass (fake-quant); the
W8A8 int8 variants also fake-quantize every Linear input per token, symmetric int8, as vLLM computes
dynamic per-token activations (scale = absmax/127, round to nearest). Compute is float32 throughout,
so the differences come from quantization only. Metrics over --eval-text windows (default: the shipped
evaluation text, gemmaquant/formats/texts/default_eval.txt, the same bytes as the development dev-eval.txt):
mean KL(bf16 ‖ quantized) per token and top-1 agreement. Calibration uses the packaged default text
unless --calib names a file. For a held-out check, calibrate on one part of a text and evaluate on
another (`--calib A.txt --eval-text B.txt`): never calibrate on the evaluated text, or the number
measures fitting, not quantization.
Targets: int8 SmoothQuant KL ≤ ½ int8 RTN's; w4a16 GPTQ/AWQ KL ≤ ½ RTN's and top-1 ≥ 0.8.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gemmaquant.calib import calibrate
from gemmaquant.calib.data import calibration_batches, load_tokenizer_for
from gemmaquant.formats.inputs import read_text
from gemmaquant.calib.fold import consumer_names
from gemmaquant.calib.gptq import gptq_quantize
from gemmaquant.numerics.ct.grid import rtn, split_rows
from gemmaquant.calib.runner import embed_ids
from gemmaquant.calib.stats import InputStats
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.model.loading import load_layer, load_model
from gemmaquant.model.gemma import make_layer_context
from gemmaquant.formats.texts import builtin_eval_path

EVAL_TEXT = builtin_eval_path()  # the shipped evaluation text (licence documents)


def act_int8_hooks(model):
    """Per-token symmetric int8 fake-quant of every Linear input (vLLM's dynamic W8A8 activations)."""
    def q(_m, args):
        x = args[0]
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0
        return (torch.clamp(torch.round(x / s), -128, 127) * s,)
    return [m.register_forward_pre_hook(q) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def eval_windows(tok, path: Path, n: int, length: int, bos: int) -> torch.Tensor:
    """n BOS-led windows of `length` tokens spread evenly over the text (disjoint when it is long enough)."""
    text = read_text(path, "--calib")
    try:
        ids = list(tok.encode(text, add_bos=False))
    except TypeError:
        ids = tok.encode(text, add_special_tokens=False).ids
    span = length - 1
    step = max(span, (len(ids) - span) // n)
    if (n - 1) * step + span > len(ids):
        raise SystemExit(f"{path}: {len(ids)} tokens hold fewer than {n} windows of {span}")
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


@torch.no_grad()
def gptq_true_sequential(ck, ids, *, damp=0.01, act_order=True, batch_size=4) -> dict:
    """Experimental GPTQ whose statistics follow the data flow INSIDE each layer, not only between layers.

    calibrate() collects every Linear's XᵀX in one pass of the still-float layer, so o_proj is fitted
    to inputs made by float q/k/v and down_proj to a float gate/up product. Here (the GPTQ reference's
    --true-sequential) each group is quantized in data-flow order qkv → o → gate_up → down, and the next
    group's XᵀX comes from a fresh pass through the partly quantized layer: 4 statistics passes per layer
    instead of 1. Clip search and scale refit on, as calibrate()'s default. → {Linear name: WeightQuant}.
    """
    cfg = ck.config
    n, seq = ids.shape
    h = embed_ids(ck, ids, torch.float32)
    out = torch.empty_like(h)
    ctx = make_layer_context(cfg, seq, torch.device("cpu"), torch.float32)
    result = {}
    for i in range(cfg.num_hidden_layers):
        layer = load_layer(ck, i, torch.float32)
        for mapping in ("qkv", "o", "gate_up", "down"):
            names = consumer_names(mapping)
            lins = [layer.get_submodule(sfx) for sfx in names]
            st = InputStats(frozenset({"xtx"}))
            hd = lins[0].register_forward_pre_hook(lambda _m, a, st=st: st.update(a[0]))
            for b in range(0, n, batch_size):
                layer(h[b:b + batch_size], ctx)
            hd.remove()
            W = torch.cat([lin.weight for lin in lins])
            q = gptq_quantize(W, st.xtx, bits=4, group_size=128, symmetric=True, damp=damp,
                              act_order=act_order, mse=True, refit=True)
            for sfx, lin, part in zip(names, lins, split_rows(q, [lin.out_features for lin in lins])):
                result[f"model.layers.{i}.{sfx}"] = part
                lin.weight.copy_(part.dequantize())
        for b in range(0, n, batch_size):
            out[b:b + batch_size] = layer(h[b:b + batch_size], ctx)
        h, out = out, h
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="HF bf16 Gemma dir (default: the demo model)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--calib", type=Path, default=None, help="calibration text (default: the packaged one)")
    ap.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration window offsets")
    ap.add_argument("--eval-text", type=Path, default=EVAL_TEXT)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.8])
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ damping of the variants that do not set it")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per variant here")
    args = ap.parse_args()
    if args.model is None:
        from gemmaquant.formats.demo import ensure_demo_checkpoint
        args.model = ensure_demo_checkpoint()
    ck = Checkpoint(args.model)
    tok = load_tokenizer_for(ck.path)
    bos = ck.config.bos_token_id or 2
    notes: list[str] = []
    calib = calibration_batches(tok, args.calib, args.calib_samples, args.calib_len, args.calib_seed,
                                bos_id=bos, notes=notes)
    ev = eval_windows(tok, args.eval_text, args.eval_samples, args.eval_len, bos)
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
        "w4a16 gptq damp 0.001": dict(scheme="w4a16", algorithm="gptq", kw=dict(damp=0.001)),
        "w4a16 gptq no act-order": dict(scheme="w4a16", algorithm="gptq", kw=dict(act_order=False)),
        "w4a16 gptq float-target": dict(scheme="w4a16", algorithm="gptq", kw=dict(float_target=True)),
        "w4a16 gptq true-sequential": dict(custom=lambda: gptq_true_sequential(ck, calib, damp=args.damp)),
        "w4a16 awq": dict(scheme="w4a16", algorithm="awq"),
        "w4a16 awq+gptq": dict(scheme="w4a16", algorithm="awq+gptq"),
        "w4a16-asym rtn": dict(fn=lambda w: rtn(w, 4, 128, False).dequantize()),
        "w4a16-asym gptq": dict(scheme="w4a16-asym", algorithm="gptq"),
    }
    calib_name = args.calib.name if args.calib else "default"
    print(f"model {ck.path.name}; calibration {args.calib_samples}x{args.calib_len} tokens of {calib_name} "
          f"(seed {args.calib_seed}); eval {args.eval_samples}x{args.eval_len} tokens of {args.eval_text.name}",
          flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    print(f"{'variant':34s} {'KL':>9s} {'top-1':>7s} {'calib s':>8s}", flush=True)
    for name, v in variants.items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        if "custom" in v:
            set_weights(v["custom"]())
        elif "scheme" in v:
            kw = {"damp": args.damp, **v.get("kw", {})}
            res = calibrate(ck, v["scheme"], algorithm=v["algorithm"], ids=calib, alpha=v.get("alpha", 0.5),
                            **kw)
            set_weights(res.quantized, res.overrides)
        else:
            set_weights(fn=v["fn"])
        dt = time.time() - t0
        hooks = act_int8_hooks(model) if v.get("act") else []
        kl, top1 = compare(model, ev, ref_lp)
        for h in hooks:
            h.remove()
        print(f"{name:34s} {kl:9.4f} {top1:7.3f} {dt:8.1f}", flush=True)
        if args.json is not None:
            row = dict(variant=name, calib=calib_name, calib_seed=args.calib_seed,
                       calib_tokens=f"{args.calib_samples}x{args.calib_len}",
                       damp=v.get("kw", {}).get("damp", args.damp) if ("scheme" in v or "custom" in v) else None,
                       eval=args.eval_text.name, eval_tokens=f"{args.eval_samples}x{args.eval_len}",
                       kl=round(kl, 5), top1=round(top1, 4), calib_s=round(dt, 1))
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
