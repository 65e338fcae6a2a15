"""Issue 21: GGUF files better than llama.cpp's at the same size, judged by llama.cpp itself.

    python benchmarks/bench_gguf_optimized.py --llama-bin BUILD/bin [--llama-src LLAMA_CPP_TREE]
        [--dir WORK] [--types q4_0 q3_k_m q2_k iq4_xs iq3_m q6_k q5_k_m] [--budget q3_k_m q4_0]
        [--budget-keep TENSOR ...] [--text FILE] [--calib FILE] [--ctx 512] [--chunks N] [--calib-chunks N] [--threads 2] [--damp D] [--json OUT]
        [--weights-only] [--float-target RIDGE] [--sens-weights-only] [--sens-feedback]

BUILD/bin must hold llama-quantize, llama-imatrix and llama-perplexity (a plain CMake build of the
llama.cpp tree; they all get `-nr`, no weight repacking). Per type P, on the demo model:
* llama.P       bf16 GGUF (llama.cpp's convert_hf_to_gguf.py from --llama-src, else our bf16
                writer, byte-identical to it) -> `llama-quantize P`;
* llama-imx.P   the same with `--imatrix`, llama-imatrix's on the calibration text (-c CTX);
* ours.P        llama-imx.P with the data of every decoder-layer Linear replaced (same types, same
                bytes count, same offsets) by error-feedback rounding (gemmaquant/calib/ggml_gptq.py)
                calibrated layer by layer on the SAME tokens llama-imatrix saw (its chunking);
* for P in --budget: budget-llama.P (llama-quantize with per-tensor types chosen by measured
  sensitivity, calib/sensitivity.py + calib/budget.py, to fit the size of llama.cpp's smaller P file)
  and budget.P (that mix with our error-feedback codes). The sensitivity counts llama.cpp's CPU
  rounding of each Linear's input for each type; --sens-weights-only leaves it out (files tagged .w).
  --sens-feedback scores the decoder Linears at their error-feedback codes, as the CLI does for
  `--algorithm gptq` (files tagged .fb).
Each file is scored by `llama-perplexity --kl-divergence` against the bf16 GGUF's logits on --text
(default: benchmarks/heldout/gpl3_apache2.txt, neither the calibration text nor the shipped evaluation
text; see benchmarks/heldout/NOTICE.md). Files and logs already in --dir are reused: delete to redo.
With --weights-only each file is also scored as its exact F32 dequantization: llama.cpp's CPU backend
rounds every activation to 8 bits in a quantized dot product (Q8_0/Q8_K blocks), the same whatever the
weights' codes; the F32 copy keeps the weights' damage and drops that rounding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_imatrix_quality import parse_kld_log

HERE = Path(__file__).resolve().parent
TYPES = ["q4_0", "q3_k_m", "q2_k", "iq4_xs", "iq3_m", "q6_k", "q5_k_m"]


def run(cmd: list, log: Path) -> str:
    if not log.exists():
        t0 = time.perf_counter()
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        log.write_text(proc.stdout + proc.stderr + f"\n# wall {time.perf_counter() - t0:.1f} s\n")
    return log.read_text()


def calib_ids(ckpt, calib: Path | None, ctx: int) -> torch.Tensor:
    """llama-imatrix's chunks of the calibration text (None: gemmaquant's built-in one): its tokenizer
    call (BOS, no special-token parsing), chunks of ctx with BOS written over the first token."""
    from gemmaquant.calib.data import default_text, load_tokenizer_for
    from gemmaquant.calib.imatrix import llama_chunks

    tok = load_tokenizer_for(ckpt.path, rows=ckpt.config.vocab_size)
    text = default_text() if calib is None else calib.read_text(encoding="utf-8")
    ids = tok.encode(text, add_bos=True, parse_special=False)
    return llama_chunks(ids, ctx, ckpt.config.bos_token_id)


def tensor_types(path: Path) -> dict:
    from gemmaquant.formats.gguf.reader import GGUFFile

    f = GGUFFile(path)
    try:
        return {n: (t.qtype, t.shape) for n, t in f.tensors.items()}
    finally:
        f.close()


def build_ours(ckpt, ids, template: Path, out: Path, info: Path, threads: int, opts: dict | None = None) -> dict:
    """Our error-feedback bytes for every decoder-layer Linear of `template`, patched into a copy."""
    from gemmaquant.calib.ggml_calibrate import optimize_gguf_tensors
    from gemmaquant.export.gguf.patch import GGUFPatcher

    if out.exists() and info.exists():
        return json.loads(info.read_text())
    torch.set_num_threads(threads)
    types = {n: t for n, (t, _) in tensor_types(template).items() if n.startswith("blk.") and len(_) == 2}
    with GGUFPatcher(template, out, force=True) as p:
        rep = optimize_gguf_tensors(ckpt, types, ids, sink=p.write, **(opts or {}))
    res = {"seconds": rep.seconds, "tokens": rep.tokens, "summary": rep.summary(),
           "layer_loss_ratio": {t.name: t.loss / t.loss_llama for t in rep.tensors if t.loss_llama > 0},
           "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "options": opts or {}}
    info.write_text(json.dumps(res, indent=1))
    return res


def float_target_weight(W, xtx, xfx, ridge: float):
    """W + W·(FᵀX − XᵀX)·(XᵀX + λI)⁻¹: the least-squares fit of the float outputs, ridged toward W."""
    H = xtx.double()
    A = H + ridge * H.diagonal().mean().clamp(min=1e-30) * torch.eye(H.shape[0], dtype=H.dtype)
    return (W.double() + torch.linalg.solve(A, (W.double() @ (xfx.double() - H)).T).T).to(W.dtype)


def build_float_target(ckpt, ids, template: Path, out: Path, info: Path, threads: int, ridge: float) -> dict:
    """`build_ours` with the float target: the library's error feedback on W_t instead of W."""
    from gemmaquant.calib.ggml_calibrate import imatrix_of, optimize_layer_tensor
    from gemmaquant.calib.runner import run_layers
    from gemmaquant.calib.stats import INPUT_OF
    from gemmaquant.export.gguf.patch import GGUFPatcher
    from gemmaquant.formats.gguf.names import gguf_name

    if out.exists() and info.exists():
        return json.loads(info.read_text())
    torch.set_num_threads(threads)
    types = {n: t for n, (t, _) in tensor_types(template).items() if n.startswith("blk.") and len(_) == 2}
    t0 = time.perf_counter()
    with GGUFPatcher(template, out, force=True) as p:
        def on_layer(i, layer, stats):
            for sfx in INPUT_OF:
                name = gguf_name(f"model.layers.{i}.{sfx}.weight", ckpt.config.generation)
                if name not in types:
                    continue
                st, lin = stats[f"model.layers.{i}.{sfx}"], layer.get_submodule(sfx)
                W = float_target_weight(lin.weight.detach(), st.xtx, st.xfx, ridge)
                data, values, *_ = optimize_layer_tensor(W, st.xtx, types[name], imatrix_of(st.sum_sq, st.count))
                p.write(name, data.numpy())
                with torch.no_grad():
                    lin.weight.copy_(values.to(lin.weight.dtype))

        run_layers(ckpt, ids, kinds={"xtx", "sum_sq", "xfx"}, on_layer=on_layer, sequential=True, float_target=True)
    res = {"seconds": time.perf_counter() - t0, "tokens": int(ids.numel()), "options": {"float_target": ridge},
           "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    info.write_text(json.dumps(res, indent=1))
    return res


def sensitivity(ckpt, ids, path: Path, samples: int, activations: bool = True, feedback: bool = False) -> dict:
    from gemmaquant.calib.sensitivity import BUDGET_TYPES, measure_sensitivity

    if path.exists():
        return json.loads(path.read_text())
    rep = measure_sensitivity(ckpt, ids[:samples], embed_types=BUDGET_TYPES, types=BUDGET_TYPES,
                              activations=activations, feedback=feedback,
                              progress=lambda a, b, w: print(f"  sensitivity {w}", flush=True))
    res = {"seconds": rep.seconds, "tokens": rep.tokens, "kl_tokens": rep.kl_tokens, "layer_gain": rep.layer_gain,
           "tensors": {n: {"shape": list(s.shape), "kl": {t.name: v for t, v in s.kl.items()}, "detail": s.detail}
                       for n, s in rep.tensors.items()}}
    path.write_text(json.dumps(res, indent=1))
    return res


def budget_types(sens: dict, template: Path, target_size: int, keep: tuple = ()) -> tuple[dict, int]:
    """Types for every measured tensor but those in `keep` so that the file fits target_size (the
    template's other bytes, header and `keep` included, stay as they are)."""
    from gemmaquant.calib.budget import Option, solve, tensor_bytes, total_bytes
    from gemmaquant.numerics.ggml.types import GGMLType

    layout = tensor_types(template)
    chosen = {n: s for n, s in sens["tensors"].items() if n not in keep}
    fixed = template.stat().st_size - sum(tensor_bytes(tuple(layout[n][1]), layout[n][0]) for n in chosen)
    options = {n: [Option(GGMLType[t], tensor_bytes(tuple(s["shape"]), GGMLType[t]), kl) for t, kl in s["kl"].items()]
               for n, s in chosen.items()}
    choice = solve(options, target_size - fixed)
    return choice, fixed + total_bytes(choice)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", required=True, type=Path)
    ap.add_argument("--llama-src", type=Path, help="llama.cpp tree with convert_hf_to_gguf.py (default: our bf16 writer)")
    ap.add_argument("--model", type=Path, help="HF checkpoint directory (default: the demo model)")
    ap.add_argument("--dir", type=Path, default=Path("bench-gguf-optimized"))
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--budget", nargs="*", default=["q3_k_m", "q4_0"])
    ap.add_argument("--text", type=Path, default=HERE / "heldout" / "gpl3_apache2.txt")
    ap.add_argument("--calib", type=Path, default=None, help="default: gemmaquant's built-in calibration text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=-1, help="llama-perplexity --chunks (-1: the whole text)")
    ap.add_argument("--calib-chunks", type=int, default=-1,
                    help="first N of llama-imatrix's chunks for our calibration (-1: all, the same tokens)")
    ap.add_argument("--budget-keep", nargs="*", default=[], metavar="TENSOR",
                    help="GGUF tensors the budget leaves at llama.cpp's type (e.g. token_embd.weight: then the "
                         "budget only re-spends the decoder layers' bytes); its files get a '.keep' infix")
    ap.add_argument("--sens-samples", type=int, default=8, help="calibration chunks the sensitivity pass uses")
    ap.add_argument("--sens-weights-only", action="store_true",
                    help="budget from the weights' errors alone, without llama.cpp's CPU rounding of the "
                         "activations (files tagged .w)")
    ap.add_argument("--sens-feedback", action="store_true",
                    help="score the decoder Linears at their error-feedback codes, as `--algorithm gptq` does "
                         "(files tagged .fb)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--damp", type=float, default=None,
                    help="error-feedback damping, a fraction of mean(diag H) (default: the library's)")
    ap.add_argument("--float-target", type=float, default=None, metavar="RIDGE",
                    help="build `ours` with the float-output target (a variant that did not help; see above)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--weights-only", action="store_true",
                    help="also score each file's weights alone: its F32 dequantization (llama-quantize "
                         "--allow-requantize --pure F32), which llama.cpp runs without quantizing activations")
    args = ap.parse_args()

    from gemmaquant.calib.data import DEFAULT_NAME, default_text
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.formats.demo import ensure_demo_checkpoint

    d = args.dir
    d.mkdir(parents=True, exist_ok=True)
    bins = {k: args.llama_bin / f"llama-{k}" for k in ("quantize", "imatrix", "perplexity")}
    model = args.model or ensure_demo_checkpoint()
    ckpt = Checkpoint(model)
    calib = args.calib
    if calib is None:
        calib = d / DEFAULT_NAME
        calib.write_text(default_text(), encoding="utf-8")
    t = str(args.threads)

    bf16 = d / "model.bf16.gguf"
    if not bf16.exists():
        if args.llama_src:
            src = args.llama_src
            env = ["env", f"PYTHONPATH={src / 'gguf-py'}:{src}"]
            run([*env, sys.executable, src / "convert_hf_to_gguf.py", model, "--outfile", bf16, "--outtype", "bf16"],
                d / "convert.log")
        else:
            from gemmaquant.export.gguf.writer import write_gguf

            write_gguf(ckpt, "bf16", bf16)
    imatrix = d / "imatrix.gguf"
    run([bins["imatrix"], "-m", bf16, "-f", calib, "-c", args.ctx, "-o", imatrix, "-t", t, "-nr"], d / "imatrix.log")
    ids = calib_ids(ckpt, calib, args.ctx)
    if args.calib_chunks > 0:  # fewer tokens than llama-imatrix saw: a handicap for ours, never an edge
        ids = ids[:args.calib_chunks]

    ppl = [bins["perplexity"], "-f", args.text, "-c", args.ctx, "--chunks", args.chunks, "-t", t, "-nr"]
    base = d / "base.kld"
    base_log = run([*ppl, "-m", bf16, "--kl-divergence-base", base], d / "base.kld.log")

    def score(f: Path) -> dict:
        r = parse_kld_log(run([*ppl, "-m", f, "--kl-divergence-base", base, "--kl-divergence"], f.with_suffix(".kld.log")))
        r["bytes"] = f.stat().st_size
        return r

    def score_weights(f: Path) -> dict:
        """The file's weights with llama.cpp's activation rounding taken out: its exact F32
        dequantization, scored the same way. On a quantized file llama.cpp's CPU dot products round
        every activation to 8 bits (Q8_0/Q8_K blocks), the same for any weights of the type: the
        difference between the two scores is that, the weights' own damage is this score."""
        deq = f.with_name(f.stem + ".f32.gguf")
        log = deq.with_suffix(".kld.log")
        if not log.exists():
            run([bins["quantize"], "--allow-requantize", "--pure", f, deq, "F32", t], f.with_name(deq.stem + ".quantize.log"))
            score(deq)
            deq.unlink()  # 4 bytes a weight: score it, keep the log, not the file
        r = parse_kld_log(log.read_text())
        r["bytes"] = f.stat().st_size
        return r

    def with_weights(f: Path, row: dict) -> dict:
        if args.weights_only:
            w = score_weights(f)
            row.update(w_kl_mean=w["kl_mean"], w_kl_mean_pm=w["kl_mean_pm"], w_top1_pct=w["top1_pct"])
        return row

    opts = {} if args.damp is None else {"damp": args.damp}
    rows: dict[str, dict] = {}
    if args.weights_only:  # what running the unquantized weights in F32 instead of BF16 alone changes
        rows["bf16"] = {"bf16 weights run as F32": score_weights(bf16)}
    for p in args.types:
        llama, imx = d / f"llama.{p}.gguf", d / f"llama-imx.{p}.gguf"
        if not llama.exists():
            run([bins["quantize"], bf16, llama, p.upper(), t], d / f"llama.{p}.quantize.log")
        if not imx.exists():
            run([bins["quantize"], "--imatrix", imatrix, bf16, imx, p.upper(), t], d / f"llama-imx.{p}.quantize.log")
        label = "ours gptq" if args.float_target is None else f"ours gptq, float target (ridge {args.float_target:g})"
        if args.float_target is None:
            ours = d / f"ours.{p}.gguf"
            info = build_ours(ckpt, ids, imx, ours, d / f"ours.{p}.json", args.threads, opts)
        else:
            ours = d / f"ours-ft.{p}.gguf"
            info = build_float_target(ckpt, ids, imx, ours, d / f"ours-ft.{p}.json", args.threads, args.float_target)
        rows[p] = {"llama": with_weights(llama, score(llama)), "llama+imatrix": with_weights(imx, score(imx)),
                   label: with_weights(ours, {**score(ours), "calib": info})}
        print(p, {k: (v["bytes"], v["kl_mean"]) for k, v in rows[p].items()}, flush=True)

    if args.budget:
        # their own files: the kinds of plan side by side
        w = (".w" if args.sens_weights_only else "") + (".fb" if args.sens_feedback else "")
        sens = sensitivity(ckpt, ids, d / f"sensitivity{w}.json", args.sens_samples, not args.sens_weights_only,
                           args.sens_feedback)
        for p in args.budget:
            refs = [d / f"llama.{p}.gguf", d / f"llama-imx.{p}.gguf"]
            for f, imx_flag in zip(refs, ([], ["--imatrix", imatrix])):
                if not f.exists():
                    run([bins["quantize"], *imx_flag, bf16, f, p.upper(), t], f.with_suffix(".quantize.log"))
            target = min(f.stat().st_size for f in refs)
            keep = tuple(args.budget_keep)
            tag = (f"{p}.keep" if keep else p) + w
            mix = d / f"budget-llama.{tag}.gguf"
            tt = d / f"budget.{tag}.types.txt"
            slack = 0
            while not mix.exists():
                choice, predicted = budget_types(sens, refs[1], target - slack, keep)
                layout = tensor_types(refs[1])
                plan = {**{n: layout[n][0] for n in keep}, **{n: c.qtype for n, c in choice.items()}}
                tt.write_text("".join(f"^{n.replace('.', chr(92) + '.')}$={q.name.lower()}\n" for n, q in plan.items()))
                (d / f"budget.{tag}.plan.json").write_text(json.dumps(
                    {n: {"type": c.qtype.name, "kl_est": c.damage, "bytes": c.nbytes, "why": c.why} for n, c in choice.items()},
                    indent=1))
                log = d / f"budget-llama.{tag}.quantize.log"
                run([bins["quantize"], "--imatrix", imatrix, "--tensor-type-file", tt, bf16, mix, "Q8_0", t], log)
                got = tensor_types(mix)
                bad = [n for n, q in plan.items() if got[n][0] != q]
                if bad:
                    raise SystemExit(f"llama-quantize did not keep the planned types of {bad[:5]}")
                if mix.stat().st_size > target:  # the header differs from the template's: shrink and redo
                    slack += mix.stat().st_size - target
                    mix.unlink()
                    log.unlink()
            ours = d / f"budget.{tag}.gguf"
            info = build_ours(ckpt, ids, mix, ours, d / f"budget.{tag}.json", args.threads, opts)
            row = rows.setdefault(p, {})
            kept = f" ({', '.join(keep)} kept)" if keep else ""
            kept += ", weights-only sensitivity" if args.sens_weights_only else ""
            kept += ", scored at error-feedback codes" if args.sens_feedback else ""
            row["budget, llama rounding" + kept] = with_weights(mix, score(mix))
            row["ours budgeted" + kept] = with_weights(ours, {**score(ours), "calib": info, "target_bytes": target,
                                                       "sensitivity_seconds": sens["seconds"]})

    print(f"\nKL(bf16 || Q) by llama-perplexity on {args.text.name}, -c {args.ctx}; {base_log.count('[')} chunks\n")
    wcols = " weights alone: mean KL | weights alone / llama+imatrix |" if args.weights_only else ""
    print("| type | file | bytes | mean KL | same top p % | PPL(Q) | KL / llama+imatrix |" + wcols)
    print("|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.weights_only else ""))
    for p, row in rows.items():
        ref = row.get("llama+imatrix", {}).get("kl_mean")
        wref = row.get("llama+imatrix", {}).get("w_kl_mean")
        for k, v in row.items():
            ratio = f"{v['kl_mean'] / ref:.2f}" if ref else ""
            w = ""
            if "w_kl_mean" in v:
                wratio = f"{v['w_kl_mean'] / wref:.2f}" if wref else ""
                w = f" {v['w_kl_mean']:.5f} ± {v['w_kl_mean_pm']:.5f} | {wratio} |"
            print(f"| {p} | {k} | {v['bytes']:,} | {v['kl_mean']:.5f} ± {v['kl_mean_pm']:.5f} | "
                  f"{v['top1_pct']:.2f} ± {v['top1_pct_pm']:.2f} | {v['ppl_q']:.4f} | {ratio} |{w}")
    if args.json:
        args.json.write_text(json.dumps({"text": str(args.text.name), "ctx": args.ctx, "chunks": args.chunks,
                                         "calib": str(calib.name), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
