"""`gemmaquant inspect PATH [--json]`: render `evaluate.inspect.inspect_path` with rich, or print it as JSON.

Registered in cli/app.py; evaluate/inspect.py reads, this module only renders.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..formats.inputs import human_bytes

out = Console()


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else str(n)


def _summary(info: dict) -> Table:
    t = Table(title=f"{info['path']}", show_header=False, title_justify="left")
    t.add_row("kind", info["kind"])
    arch = info.get("architecture") or info.get("model_type") or "?"
    if info.get("model_type") and info.get("model_type") != arch:
        arch += f" ({info['model_type']})"
    t.add_row("architecture", arch)
    g = info.get("gemma")
    if g:
        shape = (f"{g['layers']} layers, hidden {g['hidden_size']}, ffn {g['intermediate_size']}, "
                 f"heads {g['heads']}/{g['kv_heads']}×{g['head_dim']}, vocab {g['vocab_size']}")
        if "full_head_dim" in g:  # Gemma 4
            shape += (f"; full layers {g['full_kv_heads']}×{g['full_head_dim']}"
                      + (" (V = K)" if g["attention_k_eq_v"] else "")
                      + (f", {g['experts']} experts (top {g['experts_per_token']})" if g["experts"] else "")
                      + (f", per-layer inputs {g['per_layer_input']}" if g["per_layer_input"] else "")
                      + (f", last {g['kv_shared_layers']} layers share K/V" if g["kv_shared_layers"] else ""))
        t.add_row("shape", shape)
    if info.get("note"):
        t.add_row("note", info["note"])
    t.add_row("parameters", f"{_count(info['parameters'])} ({info['parameters']:,})")
    t.add_row("size", f"{human_bytes(info['file_bytes'], 2)} on disk, {human_bytes(info['tensor_bytes'], 2)} of tensors")
    bpw = info.get("bits_per_weight")
    t.add_row("bits per weight", f"{bpw:.3f}" if bpw is not None else "-")
    t.add_row("tensors", f"{info['tensor_count']}: " + ", ".join(f"{k}×{v}" for k, v in
                                                                 sorted(info["types"].items(), key=lambda kv: -kv[1])))
    if info["kind"] == "gguf":
        t.add_row("gguf", f"v{info['gguf_version']}, file type {info.get('file_type')}, alignment {info['alignment']}")
    return t


def _metadata(info: dict) -> Table | None:
    if info["kind"] == "gguf":
        t = Table(title="metadata", title_justify="left")
        t.add_column("key")
        t.add_column("type")
        t.add_column("value", overflow="fold")
        for k, v in info["metadata"].items():
            if isinstance(v, dict) and "array" in v:
                shown = f"[{v['count']} × {v['array']}] " + ", ".join(map(str, v["first"])) + ", …"
            else:
                shown = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
            t.add_row(k, info["metadata_types"].get(k, ""), shown)
        return t
    qc = info.get("quantization_config")
    if not qc:
        return None
    t = Table(title="quantization_config", title_justify="left", show_header=False)
    t.add_row("quant_method", str(qc.get("quant_method")))
    t.add_row("format", str(qc.get("format")))
    for name, g in qc["config_groups"].items():
        t.add_row(name, f"targets {g['targets']}; weights {g['weights']}; input activations "
                        f"{g['input_activations']}")
    t.add_row("ignore", str(qc.get("ignore")))
    return t


def _tensors(info: dict) -> Table:
    t = Table(title="tensors", title_justify="left")
    for col, just in (("name", "left"), ("type", "left"), ("shape", "left"), ("bytes", "right"),
                      ("bits/weight", "right")):
        t.add_column(col, justify=just)
    for x in info["tensors"]:
        bpw = x["bits_per_weight"]
        t.add_row(x["name"], x["type"], "×".join(map(str, x["shape"])) or "scalar", f"{x['bytes']:,}",
                  f"{bpw:.2f}" if bpw is not None else "-")
    return t


def inspect_cmd(
    path: Path = typer.Argument(..., help="A GGUF file, a model directory (HF or gemmaquant output) or a .safetensors file."),
    json_out: bool = typer.Option(False, "--json", help="Print everything as JSON on stdout."),
):
    """Architecture, parameter count, per-tensor type and shape, bits per weight, file size, and the
    quantization_config or GGUF metadata of PATH (headers only; tensor data is not read)."""
    from ..evaluate.inspect import inspect_path

    info = inspect_path(path)
    if json_out:
        sys.stdout.write(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        return
    out.print(_summary(info))
    meta = _metadata(info)
    if meta is not None:
        out.print(meta)
    out.print(_tensors(info))
