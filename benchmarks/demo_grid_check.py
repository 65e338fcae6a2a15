"""How much of the demo model re-quantizes onto itself, per GGUF preset (the demo-model.md caveat, measured).

    python benchmarks/demo_grid_check.py [q4_k_m q6_k ...]

The demo checkpoint was dequantized from a Q4_K_M GGUF (Q4_K / Q5_0 / Q6_K / Q8_0 tensors), so a preset
whose per-tensor types match those grids reproduces most weights exactly and its drift says little;
in particular an imatrix cannot lower KL where there is almost no rounding error left. For each preset:
the share of 2-D weights (embedding excluded) whose re-quantized value equals the bf16 source, and the
relative error ‖dequant(quant(W)) − W‖ / ‖W‖ over them.
"""

from __future__ import annotations

import sys

import torch

from gemmaquant.formats.checkpoint import resolve_model
from gemmaquant.numerics.ggml.dequantize import dequantize
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.export.gguf.plan import plan_types, preset


def main(presets: list[str]) -> None:
    ckpt = resolve_model("demo")
    print("| preset | weights reproduced exactly | relative error |\n|---|---:|---:|")
    for name in presets:
        plans = plan_types(ckpt.config, preset(name), False, has_lm_head=False)
        total = same = 0
        err = norm = 0.0
        for p in plans:
            if len(p.shape) != 2 or p.name == "token_embd.weight":
                continue
            w = ckpt.tensor(p.hf_name).float()
            d = dequantize(quantize(w.to(torch.bfloat16), p.type), p.type, tuple(w.shape)).reshape(w.shape)
            total += w.numel()
            same += int((d.to(torch.bfloat16).float() == w).sum())
            err += float(((d - w) ** 2).sum())
            norm += float((w ** 2).sum())
        print(f"| {name} | {same / total:.2%} | {(err / norm) ** 0.5:.3%} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["q4_k_m", "q4_k_s", "q5_k_m", "q6_k", "q4_0"])
