"""Gemma 4 compressed-tensors rows for RESULTS.md §10: the mixture of experts and the multimodal wrapper,
round-to-nearest schemes, on the tiny checkpoints of tests/tiny_gemma4.py (saved by transformers in bf16).

    python benchmarks/gemma4_ct.py

Per combination and scheme: the Linears quantized (of them per-expert), output and source tensor bytes,
the relative weight error ‖W_q − W‖/‖W‖ of the experts (mean / max over expert Linears), how transformers
5.23 + compressed-tensors (`dequantize=True`, with the per-expert conversion mapping registered only here)
loads it, the largest relative difference between our dequantized expert weights and compressed-tensors'
own `decompress` of the stored tensors, and for weight-only schemes ‖Δ‖/‖ref‖ of our `eval` model's logits
against the transformers-loaded model's. Test: `pytest tests/export/test_gemma4_ct.py -m slow`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemmaquant.evaluate.artifact import open_artifact  # noqa: E402
from gemmaquant.formats.checkpoint import Checkpoint  # noqa: E402
from gemmaquant.formats.safetensors import SafetensorsFile  # noqa: E402
from gemmaquant.pipeline import QuantizeOptions, run_quantize  # noqa: E402
from gemmaquant.schemes import get_scheme  # noqa: E402
from tests.tiny_gemma4 import WRAPPED, make_tiny_gemma4, per_expert_conversion  # noqa: E402

WHAT = {"moe": "MoE-like (H 64, 16 experts × I 32, top 4)", "moe-mm": "MoE-like in Gemma4ForConditionalGeneration",
        "e2b-mm": "E2B-like in Gemma4ForConditionalGeneration (vision + audio)",
        "moe-256": "MoE-like, 256-wide (H 256, I 256)", "moe-256-mm": "MoE-like 256-wide, multimodal wrapper"}
CASES = [("moe", "fp8"), ("moe", "int8"), ("moe-mm", "fp8"), ("e2b-mm", "fp8"), ("e2b-mm", "int8"),
         ("moe-256", "fp8"), ("moe-256", "int8"), ("moe-256", "int8-w8a16"), ("moe-256", "w4a16"),
         ("moe-256", "w4a16-asym"), ("moe-256-mm", "w4a16")]


def row(src: Path, variant: str, scheme: str, out: Path) -> str:
    import transformers
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    try:
        summary = run_quantize(Checkpoint(src), get_scheme(scheme), out, QuantizeOptions(algorithm="rtn"))
    except Exception as e:  # noqa: BLE001 - a refusal is a result here
        return f"| {WHAT[variant]} | {scheme} | refused: {str(e).split(': ', 1)[-1][:90]} | | | | |"
    art = open_artifact(str(out), torch.float32)
    c, sch = art.config, get_scheme(scheme)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    qs = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    files = [SafetensorsFile(p) for p in out.glob("*.safetensors")]
    names = {n: f for f in files for n in f.keys()}
    ref = Checkpoint(src)
    errs, vs_ct = [], 0.0
    for i, layer in enumerate(art.model.layers):
        if not c.is_moe:
            break
        for suffix, (fused, rows, _) in c.expert_linears(i).items():
            e, proj = int(suffix.split(".")[1]), suffix.split(".")[2]
            ours = getattr(layer.experts, proj)[e].dequantize().float()
            w = ref.tensor(f"model.layers.{i}.{fused}")[e][rows].float()
            errs.append(float((ours - w).norm() / w.norm()))
            stored = next(n.rsplit(".", 1)[0] for n in names if n.endswith(f"layers.{i}.{suffix}.weight_scale"))
            sd = {n[len(stored) + 1:]: f.get(n) for n, f in names.items() if n.startswith(stored + ".")}
            theirs = comp.decompress(sd, qs)["weight"].float()
            vs_ct = max(vs_ct, float((ours - theirs).abs().max() / theirs.abs().max()))
    for f in files:
        f.close()
    cls = transformers.AutoModelForImageTextToText if variant in WRAPPED else transformers.AutoModelForCausalLM
    unread = c.is_moe and (sch.ct_format == "int-quantized" or not sch.weights.symmetric)
    with per_expert_conversion() if not unread else contextlib.nullcontext():
        hf, info = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                       experts_implementation="eager", output_loading_info=True,
                                       quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    load = f"{len(info['missing_keys'])} missing / {len(info['unexpected_keys'])} unexpected"
    if unread:
        load += " (experts: transformers' dequantizer reads no int8 / zero-point experts)"
    logits = "–"
    if sch.ct_format == "pack-quantized" and not unread:
        ids = torch.randint(5, 300, (1, 24), generator=torch.Generator().manual_seed(0))
        ids[:, 0] = 2
        with torch.no_grad():
            a, b = art.model(ids), hf.float()(input_ids=ids, use_cache=False).logits
        logits = f"{float((a - b).norm() / b.norm()):.1e}"
    n_exp = 3 * c.num_experts * c.num_hidden_layers
    err = f"{sum(errs) / len(errs):.4f} / {max(errs):.4f}" if errs else "–"
    tensors = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    source = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    return (f"| {WHAT[variant]} | {scheme} | {list(summary.types.values())[0]} ({n_exp} experts) | "
            f"{tensors / 1e6:.2f} / {source / 1e6:.2f} | {err} | {load} | "
            f"{vs_ct:.1e} | {logits} |") if c.is_moe else (
            f"| {WHAT[variant]} | {scheme} | {list(summary.types.values())[0]} | "
            f"{tensors / 1e6:.2f} / {source / 1e6:.2f} | – | {load} | – | {logits} |")


def main() -> None:
    print("| combination | scheme | Linears quantized | safetensors MB out / source | experts ‖ΔW‖/‖W‖ mean / max "
          "| transformers load | ours vs compressed-tensors' decompress (max rel) | logits vs transformers |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root, made = Path(tmp), set()
        for variant, scheme in CASES:
            if variant not in made:
                make_tiny_gemma4(variant, root / variant, dtype=torch.bfloat16)
                made.add(variant)
            print(row(root / variant, variant, scheme, root / f"{variant}-{scheme}"), flush=True)


if __name__ == "__main__":
    main()
