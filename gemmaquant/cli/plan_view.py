"""What `quantize --dry-run` prints (the per-tensor plan and the estimated size) and the final summary."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..formats.checkpoint import Checkpoint
from ..pipeline import mmproj_target, plan_rows
from ..schemes import Scheme
from ..formats.inputs import human_bytes


_LAYER = re.compile(r"^(?:model\.)?(layers|blk)\.(\d+)\.")
_COUNTER = re.compile(r"\b(attn_v|ffn_down) \d+\b")  # the plan's per-layer counter: "ffn_down 4/18: ..."


def role_of(tensor: str) -> tuple[str, int | None]:
    """`model.layers.12.mlp.down_proj.weight` → ("layers.*.mlp.down_proj", 12); `token_embd.weight` →
    ("token_embd", None)."""
    name = tensor.removesuffix(".weight")
    m = _LAYER.match(name)
    if not m:
        return name.removeprefix("model."), None
    return f"{m.group(1)}.*.{name[m.end():]}", int(m.group(2))


def _spans(layers: list[int]) -> str:
    """[0, 1, 2, 4, 7, 8] → "0-2,4,7-8"."""
    out, start = [], None
    for i, v in enumerate(layers):
        if start is None:
            start = v
        if i + 1 == len(layers) or layers[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def group_rows(rows: list[dict]) -> list[dict]:
    """One row per tensor role, shape, type and note (so a role whose layers differ in type, such as
    q4_k_m's ffn_down, gets a row per type), with the count and the layers it covers."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        role, layer = role_of(r["tensor"])
        note = _COUNTER.sub(r"\1 i", r["note"])
        key = (role, tuple(r["shape"]), r["type"], note)
        g = groups.setdefault(key, {"role": role, "count": 0, "layers": [], "shape": r["shape"],
                                    "type": r["type"], "bytes": 0, "note": note})
        g["count"] += 1
        g["bytes"] += r["bytes"]
        if layer is not None:
            g["layers"].append(layer)
    first = {}
    for g in groups.values():  # rows of one role stay together, in plan order
        first.setdefault(g["role"], len(first))
    return sorted(groups.values(), key=lambda g: (first[g["role"]], g["layers"][:1]))


def render_plan(ckpt: Checkpoint, scheme: Scheme, out_path: Path, opts, console: Console, as_json: bool,
                show_all: bool = False):
    rows = plan_rows(ckpt, scheme, opts)
    total = sum(r["bytes"] for r in rows)
    params = ckpt.config.param_count()
    if as_json:  # every tensor: scripts want the full plan
        sys.stdout.write(json.dumps({"output": str(out_path), "scheme": scheme.name, "estimated_bytes": total,
                                     "bits_per_weight": 8 * total / params, "tensors": rows}, indent=2) + "\n")
        return
    t = Table(title=f"plan: {ckpt.name} → {out_path} ({scheme.name})")
    if show_all:
        for col in ("tensor", "shape", "type", "bytes", "note"):
            t.add_column(col, overflow="fold")
        for r in rows:
            t.add_row(r["tensor"], "×".join(map(str, r["shape"])), r["type"], human_bytes(r["bytes"]), r["note"])
    else:
        for col, justify in (("tensor role", "left"), ("count", "right"), ("layers", "left"), ("shape", "left"),
                             ("type", "left"), ("bytes", "right"), ("note", "left")):
            t.add_column(col, overflow="fold", justify=justify)
        for g in group_rows(rows):
            n_layers = ckpt.config.num_hidden_layers
            layers = "all" if g["layers"] == list(range(n_layers)) else _spans(g["layers"])
            t.add_row(g["role"], f"×{g['count']}", layers, "×".join(map(str, g["shape"])), g["type"],
                      human_bytes(g["bytes"]), g["note"])
    console.print(t)
    hint = "" if show_all else f" {len(rows)} tensors in {len(group_rows(rows))} rows; --all lists each tensor."
    console.print(f"estimated output: {human_bytes(total)} of tensor data ({8 * total / params:.2f} bits per weight) "
                  f"+ metadata; source {human_bytes(ckpt.weight_nbytes())}. Nothing was written (--dry-run).{hint}")
    target = mmproj_target(ckpt, scheme, opts, out_path)  # None where no mmproj is written
    if target is not None:
        from ..export.gguf.mmproj import check_mmproj, mmproj_contents

        kind, path = target
        mm = check_mmproj(ckpt, kind)  # what the run would refuse, refused here too
        console.print(f"and beside it {path.name}: the "
                      f"{mmproj_contents(ckpt)} ({kind.upper()}, {len(mm)} tensors, "
                      f"{human_bytes(sum(t.nbytes for t in mm))}; --mmproj none: without it).")


def render_summary(summary, console: Console):
    t = Table(title=f"wrote {summary.output}", show_header=False)
    t.add_row("scheme", f"{summary.scheme} ({summary.family})")
    t.add_row("time", f"{summary.seconds:.1f} s")
    t.add_row("size", f"{human_bytes(summary.output_bytes)} (source {human_bytes(summary.source_bytes)}, "
                      f"{summary.bits_per_weight:.2f} bits per weight)")
    t.add_row("peak memory", human_bytes(summary.peak_rss_bytes))
    if summary.types:
        t.add_row("tensor types", ", ".join(f"{k}×{v}" for k, v in sorted(summary.types.items())))
    kinds: dict[str, int] = {}
    for _, why in summary.unquantized:
        kinds[why] = kinds.get(why, 0) + 1
    for why, n in kinds.items():
        t.add_row("left unquantized", f"{n} tensors: {why}")
    for note in summary.notes:
        if note:
            t.add_row("note", note)
    console.print(t)
