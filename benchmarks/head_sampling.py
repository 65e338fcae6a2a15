"""The LM head's per-type KL scored on a sample of the table's rows against the whole table (issue 19 §4).

A size budget's sensitivity pass (calib/sensitivity.py) needs the KL that quantizing the LM head (the
tied 262144-row token table of Gemma 3 and 4) to each candidate type costs. Quantizing the whole table
at the 11 budget types took over half an hour on 26B-A4B's 2816 columns, so a table of more than
`head_rows` rows is scored on a sample (`sensitivity_parts.head_sample`: the quarter of the sample with
the most probability on the calibration positions, the rest evenly spaced). This script measures that
estimate against the whole table on a real model that fits: the float final states of the budget's
calibration (8 windows × 512 tokens of the default text, the last 64 positions of each, as
`quantize --target-*` uses them) through the table at each type, whole and sampled:

    python benchmarks/head_sampling.py                    # the demo model (real Gemma 3 270M)
    python benchmarks/head_sampling.py MODEL_DIR --rows 4096,16384 --compile

Prints per type the whole-table KL, each sample size's estimate over it, and whether the types rank
alike; --json writes the numbers (the whole-table pass is the slow part: --reuse reads them back).

    python benchmarks/head_sampling.py --speed [--compile]

profiles where the whole-table pass's time goes instead: seconds to quantize 512 random rows of 2816
(26B-A4B's table width) at each budget type, and that scaled to 262144 rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemmaquant.calib.data import calibration_batches, load_tokenizer_for  # noqa: E402
from gemmaquant.calib.sensitivity import BUDGET_TYPES, candidates  # noqa: E402
from gemmaquant.calib.sensitivity_parts import Head  # noqa: E402
from gemmaquant.formats.checkpoint import resolve_model  # noqa: E402
from gemmaquant.model.loading import load_model  # noqa: E402
from gemmaquant.numerics import compiling  # noqa: E402


def final_states(ckpt, samples: int, length: int) -> torch.Tensor:
    """The float model's residual stream after the last layer [samples, length, H] on the default text."""
    ids = calibration_batches(load_tokenizer_for(ckpt.path, rows=ckpt.config.vocab_size), None, samples, length,
                              bos_id=ckpt.config.bos_token_id)
    model = load_model(ckpt)
    out = []
    with torch.no_grad():
        for b in range(0, samples, 2):
            h, ctx = model.prepare(ids[b:b + 2])
            for layer in model.layers:
                h = layer(h, ctx)
            out.append(h)
    return torch.cat(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="demo")
    ap.add_argument("--rows", default="4096,8192,16384,32768", help="sample sizes to try")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--positions", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="the compiled quantizer searches (same bytes)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--reuse", action="store_true", help="read the whole-table KLs from --json")
    ap.add_argument("--speed", action="store_true", help="time our quantizers per type on a 2816-wide table")
    a = ap.parse_args(argv)
    if a.compile:
        compiling.set_enabled(True)
    if a.speed:
        return speed()
    ckpt = resolve_model(a.model)
    h = final_states(ckpt, a.samples, a.len)
    pos = torch.arange(a.len - a.positions, a.len)
    V = ckpt.config.vocab_size
    types = candidates(ckpt.config.hidden_size, BUDGET_TYPES)  # the demo's 640 columns: no K-quant
    res = json.loads(a.json.read_text()) if a.reuse else {"model": ckpt.name, "vocab": V, "sampled": {}}
    if not a.reuse:
        t0 = time.perf_counter()
        _, full = Head(ckpt, pos, max_rows=V).kls(h, [], types)
        res["full"] = {t.name: v for t, v in full.items()}
        res["full_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"whole table: {res['full_seconds']} s", flush=True)
    for n in (int(x) for x in a.rows.split(",")):
        t0 = time.perf_counter()
        _, est = Head(ckpt, pos, max_rows=n).kls(h, [], types)
        res["sampled"][str(n)] = {"kl": {t.name: v for t, v in est.items()},
                                  "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{n} rows: {res['sampled'][str(n)]['seconds']} s", flush=True)
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
    print(table(res))


def speed(rows: int = 512, cols: int = 2816) -> None:
    from gemmaquant.calib.sensitivity_parts import quantized

    W = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16).float()
    total = 0.0
    for t in BUDGET_TYPES:
        quantized(W[:64], t, None)  # first call: compiles where --compile
        t0 = time.perf_counter()
        quantized(W, t, None)
        dt = time.perf_counter() - t0
        total += dt * 262144 / rows
        print(f"| {t.name} | {dt:.3f} | {dt * 262144 / rows:.0f} |", flush=True)
    print(f"all types, 262144 rows: {total:.0f} s")


def table(res: dict) -> str:
    full = res["full"]
    names = sorted(full, key=lambda t: full[t])
    sizes = list(res["sampled"])
    lines = ["| type | whole table KL | " + " | ".join(f"{n} rows: est/true" for n in sizes) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in sizes) + " |"]
    for t in names:
        lines.append(f"| {t} | {full[t]:.3e} | " + " | ".join(
            f"{res['sampled'][n]['kl'][t] / full[t]:.3f}" for n in sizes) + " |")
    ranks = []
    for n in sizes:
        est = res["sampled"][n]["kl"]
        same = sorted(full, key=lambda t: est[t]) == names
        worst = max(abs(est[t] / full[t] - 1) for t in full)
        ranks.append(f"{n} rows: {res['sampled'][n]['seconds']} s, same order: {same}, worst error {worst:.1%}")
    lines.append("")
    lines.append(f"whole table ({res['vocab']} rows): {res['full_seconds']} s; " + "; ".join(ranks))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
