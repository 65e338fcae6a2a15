"""vLLM (CPU) on gemmaquant's compressed-tensors outputs of tiny Gemma 4 checkpoints: a dense 31B-like, an
E2B-like (per-layer inputs, KV sharing) and a 26B-A4B-like mixture of experts (per-expert Linears): vLLM's
log-probabilities of the prompt tokens and its greedy tokens beside our own forward pass on the same output.
RESULTS.md §10.

    python benchmarks/bench_gemma4_vllm.py --vllm /path/to/vllm-venv/bin/python [--schemes fp8,w4a16]
        [--variants dense-256,e2b-256,moe-256] [--cpu-moe-reference]

fp8-static (static input scales) is calibrated on 8 × 64 tokens of the built-in calibration text; every
other scheme is round-to-nearest.

vLLM is never a gemmaquant dependency: it runs in its own Python (see benchmarks/vllm_cpu_check.py for
the venv), one child process per output, and whatever it says when it fails is printed as is (its last
error line; the full log beside the table with --keep). The checkpoints are the 256-wide variants of
tests/tiny_gemma4.py (head dims 128/256: vLLM's CPU attention has no kernel for head_dim 16), saved by
transformers in bf16.

vLLM's CPU build has no fused-MoE backend for quantized experts, so the MoE outputs stop there ("Unsupported
FP8 MoE backend: NONE"). --cpu-moe-reference installs benchmarks/vllm_cpu_moe_reference.py in the child: vLLM
still parses the config, maps our per-expert names onto its fused parameters, runs its compressed-tensors
weight loaders and post-processing, router, dense Linears and attention; only the expert GEMMs run in a torch
reference kernel on the parameters vLLM loaded (W8A8 FP8 and INT8 with vLLM's own activation quantizers; w4a16
on the bf16 weights vLLM's own EMULATION backend dequantized). The row then also compares those experts, as the
kernel read them, with our dequantization of the output. Without the flag nothing is patched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

PROMPT = [2, 17, 99, 150, 200, 31, 77, 140, 5, 250, 63, 118, 9, 201, 44, 180]
NEW = 4
CHILD = f"""
import json, sys, time
t = time.time()
ref = None
if len(sys.argv) > 3:  # --cpu-moe-reference: vllm_cpu_moe_reference.py's kernel for quantized experts
    sys.path.insert(0, sys.argv[3])
    import vllm_cpu_moe_reference as ref
    ref.install(dump=sys.argv[4])
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype=sys.argv[2], max_model_len=256, enforce_eager=True)
out = llm.generate([{{"prompt_token_ids": {PROMPT}}}], SamplingParams(max_tokens={NEW}, temperature=0, prompt_logprobs=0))
lp = [d[tok].logprob for d, tok in zip(out[0].prompt_logprobs[1:], {PROMPT}[1:])]
res = {{"tokens": list(out[0].outputs[0].token_ids), "prompt_logprobs": lp, "seconds": round(time.time() - t, 1)}}
if ref is not None:
    res["moe_reference"] = ref.report()
print("RESULT " + json.dumps(res))
"""

def ours(out: Path, dtype: torch.dtype = torch.float32) -> tuple[list[int], list[float]]:
    """Greedy tokens and the prompt tokens' log-probabilities from our forward pass on the output (dequantized
    weights, vLLM's activation rounding)."""
    from gemmaquant.evaluate.artifact import open_artifact

    model = open_artifact(str(out), dtype).model
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids)[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0].tolist()
        for _ in range(NEW):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(PROMPT):].tolist(), lp


def dequantized_f32(m) -> torch.Tensor:
    """Our dequantization of one expert Linear of the output, in float32 (the scale cast first, so no
    rounding to the stored scale's dtype: the values our forward pass multiplies by)."""
    from gemmaquant.model.qlinear import FP8Linear, Int8Linear, PackedLinear
    from gemmaquant.numerics.ct.dequantize import dequantize_fp8, dequantize_int8, dequantize_packed

    if isinstance(m, FP8Linear):
        return dequantize_fp8(m.weight, m.weight_scale.float())
    if isinstance(m, Int8Linear):
        return dequantize_int8(m.weight, m.weight_scale.float())
    if isinstance(m, PackedLinear):
        return dequantize_packed(m.weight_packed, m.weight_scale.float(), (m.out_features, m.in_features),
                                 m.num_bits, m.weight_zero_point)
    return m.dequantize().float()


def experts_vs_ours(out: Path, dump: Path) -> str:
    """The experts as vLLM holds them after its own loading and post-processing (w13 = gate rows then up
    rows, w2 = down; dequantized by the reference kernel from vLLM's parameters, for w4a16 by vLLM's
    EMULATION conversion to bf16) against our float32 dequantization of each expert's Linears in the
    output, and against ours rounded to the dtype vLLM holds them in."""
    from gemmaquant.evaluate.artifact import open_artifact

    held = torch.load(dump)
    layers = [layer for layer in open_artifact(str(out), torch.float32).model.layers if hasattr(layer, "experts")]
    if len(held) != len(layers):
        return f"experts of {len(held)} MoE layers reached the kernel, the output has {len(layers)}"
    worst = worst_rounded = 0.0
    for i, (layer, (w13, w2, dtype)) in enumerate(zip(layers, held)):
        ex = layer.experts
        for e in range(ex.num_experts):
            mine13 = torch.cat([dequantized_f32(ex.gate_proj[e]), dequantized_f32(ex.up_proj[e])])
            for theirs, mine in ((w13[e], mine13), (w2[e], dequantized_f32(ex.down_proj[e]))):
                if theirs.shape != mine.shape:
                    return f"layer {i} expert {e}: vLLM holds {tuple(theirs.shape)}, ours {tuple(mine.shape)}"
                top = mine.abs().max()
                worst = max(worst, ((theirs - mine).abs().max() / top).item())
                rounded = mine.to(getattr(torch, dtype)).float()
                worst_rounded = max(worst_rounded, ((theirs - rounded).abs().max() / top).item())
    said = f"{len(held)} layers × {ex.num_experts} experts ({dtype}); max \\|Δ\\|/max\\|W\\| vs ours {worst:.1e}"
    return said + (f", vs ours rounded to {dtype} {worst_rounded:.1e}" if dtype != "float32" else "")


def run_vllm(python: str, out: Path, log: Path, dtype: str, mine: tuple[list[int], list[float]] | None,
             reference: bool = False, mine_lp: list[float] | None = None) -> str:
    """reference: run with vllm_cpu_moe_reference.py's expert kernel installed in the child (the MoE
    layers vLLM's CPU build cannot run quantized) and compare the experts it read with ours.
    mine_lp: our log-probs in vLLM's dtype when that is not float32, quoted beside the float32 ones."""
    env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME")}, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    dump = log.with_suffix(".experts.pt")
    extra = [str(Path(__file__).resolve().parent), str(dump)] if reference else []
    dump.unlink(missing_ok=True)
    try:
        r = subprocess.run([python, "-c", CHILD, str(out), dtype, *extra], capture_output=True, text=True,
                           timeout=1800, env=env)
    except subprocess.TimeoutExpired:
        return "no answer in 30 min"
    log.write_text(r.stdout + r.stderr)
    res = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode == 0 and res:
        d = json.loads(res[-1][7:])
        said = f"generates {d['tokens']} ({d['seconds']} s with the import)"
        if mine is not None:
            dlp = max(abs(x - y) for x, y in zip(d["prompt_logprobs"], mine[1]))
            said += f"; prompt log-probs max \\|Δ\\| vs ours {dlp:.1e}"
            if mine_lp is not None:
                said += f" (vs ours in {dtype} {max(abs(x - y) for x, y in zip(d['prompt_logprobs'], mine_lp)):.1e})"
        ref = d.get("moe_reference")
        if ref is not None and ref["layers"]:
            said += (f"; reference expert kernel ({', '.join(ref['kernels'])}) in {ref['layers']} MoE layers, "
                     f"ran {ref['calls']} times; experts read: "
                     f"{experts_vs_ours(out, dump) if dump.exists() else 'no dump'}")
        elif ref is not None:
            said += "; reference expert kernel not needed (vLLM's own CPU MoE ran)"
        return said
    errs = [line for line in r.stderr.splitlines() if "Error" in line or "error" in line]
    return "fails: " + (errs[-1] if errs else (r.stderr.strip().splitlines() or ["?"])[-1]).strip()[:200]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm", required=True, help="a Python with vLLM installed")
    ap.add_argument("--schemes", default="fp8", help="comma-separated schemes (default fp8; fp8-static is calibrated)")
    ap.add_argument("--variants", default="dense-256,e2b-256,moe-256", help="tiny checkpoints (tests/tiny_gemma4.py)")
    ap.add_argument("--dtype", default="float32", help="vLLM's dtype (float32; vLLM's CPU WNA16 GEMM needs bfloat16)")
    ap.add_argument("--keep", help="keep the checkpoints, outputs and vLLM logs in this directory")
    ap.add_argument("--cpu-moe-reference", action="store_true",
                    help="install benchmarks/vllm_cpu_moe_reference.py in the vLLM child: a reference expert kernel "
                         "for the quantized MoE layers vLLM's CPU build has no backend for (vLLM still loads and "
                         "post-processes the experts; the kernel reads its parameters, not our files)")
    a = ap.parse_args()
    low = None if a.dtype == "float32" else getattr(torch, a.dtype)
    from gemmaquant.pipeline import QuantizeOptions, run_quantize
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.schemes import get_scheme
    from tests.tiny_gemma4 import make_tiny_gemma4

    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_g4_vllm_"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        names = {"dense-256": "dense 31B-like", "e2b-256": "E2B-like (per-layer inputs, KV sharing)",
                 "moe-256": "MoE 26B-A4B-like (16 experts, top 4)",
                 "e2b-256-mm": "E2B-like in Gemma4ForConditionalGeneration"}
        for variant in a.variants.split(","):
            what = names.get(variant, variant)
            src = root / variant
            if not src.is_dir():
                make_tiny_gemma4(variant, src, dtype=torch.bfloat16)
            mine = ours(src)  # our forward on the source itself: the unquantized comparison
            low_lp = ours(src, low)[1] if low else None
            rows.append((what, "bf16 source", run_vllm(a.vllm, src, root / f"{variant}.log", a.dtype, mine,
                                                       a.cpu_moe_reference, low_lp), str(mine[0])))
            for s in a.schemes.split(","):
                out = root / f"{variant}-{s}"
                shutil.rmtree(out, ignore_errors=True)
                sch = get_scheme(s)
                static = sch.input_activations is not None and not sch.input_activations.dynamic
                run_quantize(Checkpoint(src), sch, out, QuantizeOptions(algorithm=None if static else "rtn",
                                                                        calib_samples=8, calib_len=64))
                mine = ours(out)
                low_lp = ours(out, low)[1] if low else None
                rows.append((what, s, run_vllm(a.vllm, out, root / f"{variant}-{s}.log", a.dtype, mine,
                                               a.cpu_moe_reference, low_lp), str(mine[0])))
                print(rows[-1], flush=True)
        print(f"\n| model | output | vLLM (CPU, {a.dtype}) on a {len(PROMPT)}-token prompt: greedy {NEW} tokens; "
              "prompt log-probs vs ours | ours on the same output |")
        print("|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
