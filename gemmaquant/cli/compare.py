"""`gemmaquant compare BASE ARTIFACT [ARTIFACT ...] [--text FILE]`: drift of quantized artifacts.

Registered in cli/app.py; the report itself comes from evaluate/compare.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .options import COMPILE_HELP, TEXT_HELP, path_arg, set_compile
from ..errors import GemmaQuantError
from ..formats.inputs import human_bytes

out = Console()
err = Console(stderr=True)


def _formats(fmts: dict[str, int]) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(fmts.items(), key=lambda kv: -kv[1]))


def _bars(quiet: bool):
    """compare_artifacts' `run(label, total, work)`: a transient rich bar of chunks per model."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    def run(label, total, work):
        bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                       TimeRemainingColumn(), console=err, disable=quiet, transient=True)
        with bar:
            task = bar.add_task(label[:24], total=total)
            return work(lambda i: bar.update(task, completed=i))

    return run


def render_table(rep: dict) -> Table:
    """One column per model (base first), one row per metric: readable in an 80-column terminal."""
    b = rep["base"]
    t = Table(title=f"drift vs {b['name']} · {rep['chunks']}×{rep['ctx']} tokens of {_text_label(rep)} "
                    f"· {rep['dtype']}")
    t.add_column("metric")
    t.add_column(b["name"] + " (base)", justify="right")
    for a in rep["artifacts"]:
        t.add_column(a["name"] + ("" if a["tokenizer_match"] else " [yellow](tokenizer differs)[/]"),
                     justify="right")
    arts = rep["artifacts"]

    def worst(a):
        errs = a["layer_rel_error"]
        return f"L{max(range(len(errs)), key=errs.__getitem__)}: {max(errs):.3f}" if errs else "–"

    rows = [
        ("weights", _formats(b["formats"]), [_formats(a["formats"]) for a in arts]),
        ("size", human_bytes(b["size_bytes"]), [human_bytes(a["size_bytes"]) for a in arts]),
        ("bits/weight (Linears / file)", f"{b['bpw_linear']:.2f} / {b['bpw_file']:.2f}",
         [f"{a['bpw_linear']:.2f} / {a['bpw_file']:.2f}" for a in arts]),
        ("ppl", f"{b['ppl']:.4f} ± {b['ppl_stderr']:.3f}", [f"{a['ppl']:.4f} ± {a['ppl_stderr']:.3f}" for a in arts]),
        ("Δppl", "", [f"{a['delta_ppl_pct']:+.2f}%" for a in arts]),
        ("KL mean / p99", "", [f"{a['kl_mean']:.4f} / {a['kl_p99']:.4f}" for a in arts]),
        ("top-1 agreement", "", [f"{a['top1']:.3f}" for a in arts]),
        ("worst layer rel. error", "", [worst(a) for a in arts]),
        ("max |activation|", _act(b["act_max"], b["fp16_overflow_layers"]),
         [_act(a["act_max"], a["fp16_overflow_layers"]) for a in arts]),
    ]
    for name, base, vals in rows:
        t.add_row(name, base, *vals)
    return t


def _text_label(rep: dict) -> str:
    return f"{Path(rep['text']).name} (sha256 {rep['text_sha256'][:12]})"


def _act(amax: list[float], over: list[int]) -> str:
    top = max(amax) if amax else float("nan")
    if over:
        span = f"{over[0]}–{over[-1]}" if over == list(range(over[0], over[-1] + 1)) else ",".join(map(str, over))
        return f"[bold red]{top:.4g} > fp16 (layers {span})[/]"
    return f"{top:.4g}"


def layer_table(rep: dict) -> Table:
    t = Table(title="per layer: relative output error (on the base's inputs) / max |activation|")
    t.add_column("layer", justify="right")
    t.add_column(rep["base"]["name"] + " max|act|", justify="right")
    for a in rep["artifacts"]:
        t.add_column(a["name"], justify="right")
    for i, v in enumerate(rep["base"]["act_max"]):
        row = [str(i), _flag(v)]
        for a in rep["artifacts"]:
            e = a["layer_rel_error"][i] if a["layer_rel_error"] else float("nan")
            row.append(f"{e:.4f} / {_flag(a['act_max'][i])}")
        t.add_row(*row)
    return t


def _flag(v: float) -> str:
    return f"[bold red]{v:.4g}![/]" if not v <= 65504.0 else f"{v:.4g}"


def markdown(rep: dict) -> str:
    b = rep["base"]
    lines = [f"# Drift report: {b['name']}", "",
             f"Text `{rep['text']}` (sha256 `{rep['text_sha256']}`), {rep['chunks']} chunks of {rep['ctx']} tokens (llama-perplexity method), "
             f"compute {rep['dtype']} on {rep['device']}. KL(base‖artifact): {rep['kl_method']}.", "",
             "| artifact | weights | size | bpw (Linears / file) | ppl | Δppl % | KL mean | KL p99 | top-1 | max abs act |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {b['name']} (base) | {_formats(b['formats'])} | {human_bytes(b['size_bytes'])} | "
             f"{b['bpw_linear']:.2f} / {b['bpw_file']:.2f} | {b['ppl']:.4f} ± {b['ppl_stderr']:.4f} | | | | | "
             f"{max(b['act_max']):.4g} |"]
    for a in rep["artifacts"]:
        lines.append(f"| {a['name']} | {_formats(a['formats'])} | {human_bytes(a['size_bytes'])} | "
                     f"{a['bpw_linear']:.2f} / {a['bpw_file']:.2f} | {a['ppl']:.4f} ± {a['ppl_stderr']:.4f} | "
                     f"{a['delta_ppl_pct']:+.2f} | {a['kl_mean']:.5f} | {a['kl_p99']:.5f} | {a['top1']:.4f} | "
                     f"{max(a['act_max']):.4g} |")
    over = {x["name"]: x["fp16_overflow_layers"] for x in [b] + rep["artifacts"] if x["fp16_overflow_layers"]}
    lines += ["", "## float16 range", ""]
    if over:
        lines += [f"- **{k}**: activations pass 65504 (float16's largest value) in layers "
                  f"{', '.join(map(str, v))}; an fp16 engine would overflow. Serve in bf16." for k, v in over.items()]
    else:
        lines.append("No activation passes 65504; float16 engines would not overflow on this text.")
    lines += ["", "## Per layer", "", "Relative output error of each layer fed the base's input "
              "(‖L_a(h) − L_b(h)‖ / ‖L_b(h) − h‖), and max |activation|.", "",
              "| layer | base max act | " + " | ".join(a["name"] for a in rep["artifacts"]) + " |",
              "|---:|---:|" + "---:|" * len(rep["artifacts"])]
    for i, v in enumerate(b["act_max"]):
        cells = [f"{a['layer_rel_error'][i]:.4f} / {a['act_max'][i]:.4g}" if a["layer_rel_error"] else "–"
                 for a in rep["artifacts"]]
        lines.append(f"| {i} | {v:.4g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path, fmt: str | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GemmaQuantError("--plot needs matplotlib: pip install 'gemmaquant[plot]'") from None
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for a in rep["artifacts"]:
        kl = np.clip(np.asarray(a["kl_values"]), 1e-8, None)
        ax1.hist(kl, bins=np.logspace(-8, 1.5, 60), histtype="step", label=a["name"])
        if a["layer_rel_error"]:
            ax2.plot(range(len(a["layer_rel_error"])), a["layer_rel_error"], marker="o", label=a["name"])
    ax1.set(xscale="log", xlabel="KL(base ‖ artifact) per token (nats)", ylabel="tokens",
            title="KL distribution")
    ax2.set(xlabel="layer", ylabel="relative output error", yscale="log", title="per-layer error")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format=fmt)  # the format from the real name: `path` may be a temporary
    finally:
        plt.close(fig)


def _card_of(artifact: str) -> tuple[Path, str]:
    """(README.md, output key) of an artifact's model card, or a one-line error saying how to get one."""
    from ..export.model_card import card_location, read_card

    readme, key = card_location(artifact)
    data = read_card(readme)
    if data is None or not any(o["file"] == key for o in data.get("outputs", [])):
        how = ("write the GGUF with `gemmaquant quantize ... --card`" if key != "."
               else "it is written by `gemmaquant quantize`")
        raise GemmaQuantError(f"{artifact}: no gemmaquant model card for it in {readme} ({how}); --card updates "
                              "only cards gemmaquant wrote")
    return readme, key


def _record_drift(readme: Path, key: str, rep: dict, a: dict, inputs=()) -> None:
    from ..export.model_card import add_drift, read_card, write_card

    data = read_card(readme)
    b = rep["base"]
    add_drift(data, key, {"base": b["name"], "text": rep["text"], "text_sha256": rep["text_sha256"],
                          "ctx": rep["ctx"], "chunks": rep["chunks"], "dtype": rep["dtype"], "base_ppl": b["ppl"],
                          "ppl": a["ppl"], "delta_ppl_pct": a["delta_ppl_pct"], "kl_mean": a["kl_mean"],
                          "kl_p99": a["kl_p99"], "top1": a["top1"]})
    write_card(readme, data, inputs=inputs)


def compare_cmd(
    base: str = typer.Argument(..., help="The unquantized model: HF directory, repo id, or 'demo'."),
    artifacts: List[str] = typer.Argument(..., help="Quantized artifacts: GGUF files or compressed-tensors dirs."),
    text: Optional[Path] = typer.Option(None, "--text", help=TEXT_HELP, parser=path_arg("--text")),
    ctx: int = typer.Option(512, "--ctx", help="Chunk length in tokens (llama-perplexity's -c): even, 8 up to the model's context."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Use at most N chunks, N >= 1 (default: all)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to PATH ('-' for stdout).",
                                             parser=path_arg("--json")),
    markdown_path: Optional[Path] = typer.Option(None, "--markdown", help="Write a Markdown report to PATH.",
                                                 parser=path_arg("--markdown")),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Save a PNG of the KL distribution and per-layer error (needs matplotlib).",
                                             parser=path_arg("--plot")),
    force: bool = typer.Option(False, "--force", help="Replace existing --json/--markdown/--plot files."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (1-1024)."),
    compile_: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    topk: int = typer.Option(128, "--topk", help="Base log-probs kept per token for KL (top-K + remainder), 1 up to the vocabulary."),
    layer_chunks: int = typer.Option(1, "--layer-chunks", help="Chunks used for the per-layer error (0-4096; 0: none)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the base's logits even if cached."),
    card: bool = typer.Option(False, "--card", help="Write each ARTIFACT's drift into its model card (README.md: "
                              "a compressed-tensors directory's own, a GGUF's folder card from `quantize --card`)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
):
    """Drift of each ARTIFACT against BASE: size, bits/weight, ppl, Δppl, KL, top-1, per-layer error, fp16 range."""
    import torch

    from ..evaluate.artifact import model_info
    from ..evaluate.compare import compare_artifacts
    from ..export.atomic import atomic_output, write_report
    from ..export.guard import check_output
    from ..formats.inputs import check_input_file
    from ..limits import check_for_model, check_numbers
    from ..formats.texts import eval_text

    check_numbers(ctx=ctx, chunks=chunks, threads=threads, topk=topk, layer_chunks=layer_chunks, device=device,
                  dtype=dtype)
    if text is not None:
        check_input_file(text, "--text")
    if plot_path is not None:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise GemmaQuantError("--plot needs matplotlib: pip install 'gemmaquant[plot]'") from None
        kinds = Figure().canvas.get_supported_filetypes()
        if plot_path.suffix.lstrip(".").lower() not in kinds:
            raise GemmaQuantError(f"--plot {plot_path}: the name must end in an image format matplotlib writes "
                                  f"(allowed: {', '.join('.' + k for k in sorted(kinds))})")
    cfg, base_path = model_info(base)
    check_for_model(cfg, base, ctx=ctx, topk=topk)
    for a in artifacts:  # headers read now: a corrupt artifact fails before the base's run, not after it
        model_info(a)
    src = eval_text(text)  # checked (UTF-8, not empty) and hashed, streaming, before any model loads
    inputs = [base_path, *artifacts, src.path]
    cards = [_card_of(a) for a in artifacts] if card else []  # a missing card fails before the long run
    # a card lives in or beside its artifact: the guard keeps it off the base, the text and artifact files
    card_inputs = [base_path, src.path, *(a for a in artifacts if Path(a).is_file())]
    for readme, _ in cards:
        check_output(readme, force=True, kind="file", inputs=card_inputs, option="--card")
    reports = {"--json": json_path, "--markdown": markdown_path, "--plot": plot_path}
    reports = {k: v for k, v in reports.items() if v is not None and str(v) != "-"}
    seen: dict = {os.path.realpath(readme): "--card" for readme, _ in cards}
    for option, path in reports.items():  # before the run, not after it
        check_output(path, force=force, kind="file", inputs=inputs, option=option)
        key = os.path.realpath(path)
        if key in seen:
            raise GemmaQuantError(f"{path}: given to both {seen[key]} and {option}; each report needs its own file")
        seen[key] = option
    if threads:
        torch.set_num_threads(threads)
    set_compile(compile_)
    rep = compare_artifacts(base, artifacts, src, ctx, chunks, dtype, device, topk, layer_chunks,
                            use_cache=not no_cache, run=_bars(quiet),
                            say=None if quiet else lambda m: err.print(f"[dim]{m}[/]"))
    for (readme, key), a in zip(cards, rep["artifacts"]):
        _record_drift(readme, key, rep, a, card_inputs)
        if not quiet:
            err.print(f"drift written into {readme}", highlight=False)
    if json_path is not None:
        data = json.dumps(rep, indent=2) + "\n"
        if str(json_path) == "-":
            sys.stdout.write(data)
        else:
            write_report(json_path, data, force=force, inputs=inputs, option="--json")
    if markdown_path is not None:
        write_report(markdown_path, markdown(rep), force=force, inputs=inputs, option="--markdown")
    if plot_path is not None:
        with atomic_output(plot_path, force=force, kind="file", inputs=inputs, option="--plot") as tmp:
            plot(rep, tmp, fmt=plot_path.suffix.lstrip(".").lower())
    if not quiet and str(json_path) != "-":
        out.print(render_table(rep))
        out.print(layer_table(rep))
