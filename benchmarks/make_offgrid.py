"""The demo model moved off the GGUF grids it came from, for judging size budgets fairly (issue 21).

The demo's weights are the dequantized values of a Q4_K_M file: each 2-D weight sits exactly on the grid
of its source type (Q5_0, Q4_K, Q6_K or Q8_0). Re-quantized to that type, or to one whose grid contains it
(Q4_1 holds a Q4_K sub-block up to fp16 rounding), a tensor costs nothing, and a size budget that finds
those free types looks better than it would on a model never stored in GGUF grids. This writes a copy of
the demo checkpoint whose every quantized-source weight gets uniform noise of one source-grid step per
block (each value moved by U(-1/2, 1/2) × the block's step, the step estimated as the block's range over
the type's levels - 1): every value then lies anywhere in its grid cell, as a never-quantized weight
does, so no type recovers it for free. Norms stay as they are. The result is a different model (its own
bf16 reference), with the demo's architecture, tokenizer and, roughly, its quality.

    python benchmarks/make_offgrid.py /tmp/offgrid [--seed 0]
    python benchmarks/bench_gguf_optimized.py --llama-bin BUILD/bin --model /tmp/offgrid --dir WORK \
        --types q3_k_m q4_0 --budget q3_k_m q4_0
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gemmaquant.formats.demo import ensure_demo_checkpoint, ensure_demo_gguf, hf_name
from gemmaquant.formats.gguf.reader import GGUFFile

# source type -> (values per block that share one step, levels of the grid)
GRIDS = {"Q4_0": (32, 16), "Q4_1": (32, 16), "Q5_0": (32, 32), "Q5_1": (32, 32), "Q8_0": (32, 256),
         "Q4_K": (32, 16), "Q5_K": (32, 32), "Q6_K": (16, 64)}


def off_grid(w: torch.Tensor, qtype: str, gen: torch.Generator) -> torch.Tensor:
    """w (bf16 [rows, cols]) with U(-1/2, 1/2) grid steps of noise per block of its source type."""
    block, levels = GRIDS[qtype]
    x = w.to(torch.float32).reshape(-1, block)
    step = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / (levels - 1)
    noise = (torch.rand(x.shape, generator=gen) - 0.5) * step
    return (x + noise).reshape(w.shape).to(w.dtype)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    src = ensure_demo_checkpoint()
    with GGUFFile(ensure_demo_gguf()) as g:
        types = {hf_name(name): info.type_name for name, info in g.tensors.items()}
    if a.out.exists():
        raise SystemExit(f"{a.out} exists: give a new directory")
    a.out.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, a.out / f.name)
    gen = torch.Generator().manual_seed(a.seed)
    tensors = load_file(str(src / "model.safetensors"))
    moved = {}
    for name in sorted(tensors):
        qtype = types.get(name)
        if tensors[name].dim() == 2 and qtype in GRIDS:
            tensors[name] = off_grid(tensors[name], qtype, gen)
            moved[qtype] = moved.get(qtype, 0) + 1
    save_file(tensors, str(a.out / "model.safetensors"), metadata={"format": "pt"})
    print(f"{a.out}: noise of one source-grid step per block on " +
          ", ".join(f"{n} {t} tensors" for t, n in sorted(moved.items())))


if __name__ == "__main__":
    main()
