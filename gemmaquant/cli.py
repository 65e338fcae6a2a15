"""The `gemmaquant` command line: each command parses, calls the library, renders with rich."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .cli_options import COMPILE_HELP, TEXT_HELP, set_compile
from .errors import EXIT_INTERRUPTED, GemmaQuantError

app = typer.Typer(
    add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Quantize Gemma 1/2/3 checkpoints for vLLM (FP8/INT8/INT4 safetensors) and llama.cpp (GGUF), "
         "and measure the drift with a built-in forward pass.",
)
out = Console()
err = Console(stderr=True)


def _set_threads(threads: Optional[int]):
    if threads:  # torch is only imported here when asked: `quantize` to GGUF overlaps its import with the header
        import torch

        torch.set_num_threads(threads)


def _write_json(path: Optional[Path], data: dict):
    if path is None:
        return
    text = json.dumps(data, indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        path.write_text(text)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="HF model directory, Hugging Face repo id, or 'demo'."),
    text: Optional[Path] = typer.Option(None, "--text", help=TEXT_HELP),
    ctx: int = typer.Option(512, "--ctx", help="Chunk length in tokens (llama-perplexity's -c)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Evaluate at most N chunks (default: all)."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    compile_: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON to PATH ('-' for stdout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
):
    """Perplexity of MODEL on a text, by llama-perplexity's method (ppl ± stderr, tokens/s)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .evaluate import open_for_eval
    from .texts import eval_text

    _set_threads(threads)
    set_compile(compile_)
    src = eval_text(text)  # a bad --text fails before the model loads
    runner = open_for_eval(model, dtype=dtype, device=device)
    chunk_ids = runner.chunks(src, ctx, chunks)
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                  TimeRemainingColumn(), console=err, disable=quiet, transient=True) as bar:
        task = bar.add_task("eval", total=len(chunk_ids))
        res = runner.perplexity(chunk_ids, progress=lambda i: bar.update(task, completed=i))
    data = {"model": model, **src.to_dict(), "dtype": str(runner.dtype).replace("torch.", ""),
            "device": device, **res.to_dict()}
    if compile_:
        from .ggml.compiled import compiled_types

        data["compiled_dequant"] = compiled_types()  # the types whose compiled kernel ran
    _write_json(json_path, data)
    if not quiet and str(json_path) != "-":
        t = Table(title=f"perplexity of {model}", show_header=False)
        t.add_row("ppl", f"{res.ppl:.4f} ± {res.ppl_stderr:.4f}")
        t.add_row("text", src.describe())
        t.add_row("tokens scored", f"{res.tokens_scored} ({res.chunks} chunks of {res.ctx})")
        t.add_row("speed", f"{res.tokens_per_second:.1f} tokens/s ({res.seconds:.1f} s)")
        t.add_row("compute", f"{data['dtype']} on {device}")
        out.print(t)


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Argument(..., help="HF model directory, Hugging Face repo id, or 'demo'."),
    scheme: Optional[str] = typer.Option(None, "--scheme", "-s", help="Scheme or GGUF preset (see `gemmaquant schemes`)."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (safetensors) or FILE.gguf. Default: a name that encodes the scheme."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A shipped recipe name or a .toml path (see `gemmaquant recipes`)."),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", help="rtn, gptq, awq, awq+gptq, smoothquant (per scheme)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text (default: built-in mixed text)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration samples (default 128)."),
    calib_len: Optional[int] = typer.Option(None, "--calib-len", help="Tokens per calibration sample (default 512)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="SmoothQuant migration strength (default 0.8)."),
    imatrix: Optional[bool] = typer.Option(None, "--imatrix/--no-imatrix", help="GGUF: compute an importance matrix from calibration text."),
    imatrix_file: Optional[Path] = typer.Option(None, "--imatrix-file", help="GGUF: use a llama.cpp imatrix file (GGUF or legacy .dat)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    card: bool = typer.Option(False, "--card", help="GGUF: also write README.md beside the file, a Hub model card (a "
                              "second GGUF in the same folder joins it). compressed-tensors directories always get one."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="The Hub repo id of MODEL, for the card's "
                                             "base_model when it cannot be derived (a local copy of a Hub repo)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (tensors grouped by role, types, estimated size); write nothing."),
    show_all: bool = typer.Option(False, "--all", help="With --dry-run: one row per tensor instead of per role."),
    device: str = typer.Option("cpu", "--device", help="Device for calibration passes."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
):
    """Quantize MODEL to a vLLM safetensors directory or a llama.cpp GGUF file."""
    from .checkpoint import resolve_model
    from .export.model_card import valid_repo_id
    from .quantize import QuantizeOptions, check_family, default_output, run_quantize
    from .recipes import load_recipe
    from .schemes import get_scheme

    _set_threads(threads)
    settings: dict = {}
    if recipe:
        r = load_recipe(recipe)
        settings = dict(r.settings)
        if scheme and get_scheme(scheme).name != r.scheme.name:
            raise GemmaQuantError(f"--scheme {scheme} contradicts recipe {r.name} (scheme {r.scheme.name})")
        scheme = r.scheme.name
    if not scheme:
        raise GemmaQuantError("give --scheme or --recipe (schemes: see `gemmaquant schemes`)")
    s = get_scheme(scheme)
    check_family(s, out_path)
    explicit = dict(algorithm=algorithm, calib=calib, calib_samples=calib_samples, calib_len=calib_len,
                    alpha=alpha, imatrix=imatrix)
    settings.update({k: v for k, v in explicit.items() if v is not None})
    if settings.get("calib") is not None:
        settings["calib"] = Path(settings["calib"])
    if base_model is not None and not valid_repo_id(base_model):
        raise GemmaQuantError(f"--base-model {base_model!r}: expected a Hugging Face repo id such as google/gemma-3-270m")
    opts = QuantizeOptions(imatrix_file=imatrix_file, force=force, device=device, card=card, base_model=base_model,
                           command="gemmaquant " + " ".join(sys.argv[1:]), **settings)
    ckpt = resolve_model(model)
    out_p = out_path or default_output(ckpt, s)
    if dry_run:
        from .plan_view import render_plan

        render_plan(ckpt, s, out_p, opts, out, json_out, show_all=show_all)
        return
    from .progress import byte_progress

    with byte_progress(not (quiet or json_out), console=err) as bar:
        task = bar.add_task(f"writing {s.label}", total=None, tensor="")

        def progress(done, total, plan):
            bar.update(task, total=total, completed=done, tensor=plan.name)

        summary = run_quantize(ckpt, s, out_p, opts, progress=progress)
    if json_out:
        sys.stdout.write(json.dumps(summary.to_dict(), indent=2) + "\n")
    elif not quiet:
        from .plan_view import render_summary

        render_summary(summary, out)


@app.command("imatrix")
def imatrix_cmd(
    model: str = typer.Argument(..., help="HF model directory, Hugging Face repo id, or 'demo'."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Output imatrix file (llama.cpp GGUF imatrix format)."),
    calib: Optional[Path] = typer.Option(None, "--calib", "--text",
                                         help="Calibration text (default: the built-in calibration text, "
                                              "prose, code, chat turns and several languages)."),
    calib_samples: int = typer.Option(128, "--calib-samples"),
    calib_len: int = typer.Option(512, "--calib-len"),
    llama_chunks_: bool = typer.Option(
        False, "--llama-chunks",
        help="Cut the text as llama-imatrix does: consecutive --calib-len chunks of the whole text "
             "(first token of each overwritten by BOS), at most --calib-samples; gives llama-imatrix's "
             "statistics for the same text (run it with --parse-special)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
    threads: Optional[int] = typer.Option(None, "--threads"),
):
    """Compute an importance matrix with the built-in forward pass and save it as llama.cpp does."""
    from .checkpoint import resolve_model
    from .export.atomic import atomic_output
    from .imatrix import compute_imatrix, llama_chunks
    from .texts import calib_text

    _set_threads(threads)
    src = calib_text(calib)  # a bad --calib fails before the model loads
    ckpt = resolve_model(model)
    ids = dataset = None
    if llama_chunks_:
        from .calib.data import load_tokenizer_for

        tok_ids = load_tokenizer_for(ckpt.path).encode(src.content, add_bos=True, parse_special=True)
        try:
            ids = llama_chunks(tok_ids, calib_len, ckpt.config.bos_token_id, calib_samples)
        except ValueError as e:
            raise GemmaQuantError(f"{calib or 'the default calibration text'}: {e} (--calib-len)") from None
        dataset = str(calib) if calib is not None else "default_calib.txt"
    im = compute_imatrix(ckpt, calib=calib, n_samples=calib_samples, seq_len=calib_len, ids=ids, dataset=dataset)
    with atomic_output(out_path, force=force, kind="file") as tmp:
        im.save(tmp)
    out.print(f"wrote {out_path}: {len(im.sums)} entries from {im.describe()}; text {src.describe()}",
              highlight=False, soft_wrap=True)


@app.command("recipes")
def recipes_cmd(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """List the shipped recipes (use with `gemmaquant quantize MODEL --recipe NAME`)."""
    from .recipes import load_recipe, shipped_recipes

    rows = []
    for name in shipped_recipes():
        r = load_recipe(name)
        rows.append({"recipe": name, "scheme": r.scheme.name, "model": r.model or "",
                     "description": r.description, "settings": r.settings})
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    t = Table(title="gemmaquant recipes")
    for col in ("recipe", "scheme", "model", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["recipe"], r["scheme"], r["model"], r["description"])
    out.print(t)


@app.command("schemes")
def schemes_cmd(json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
                markdown: bool = typer.Option(False, "--markdown", help="Print the README's markdown table.")):
    """List the quantization schemes and GGUF presets."""
    from .schemes import scheme_markdown, scheme_table

    rows = scheme_table()
    if markdown:
        sys.stdout.write(scheme_markdown())
        return
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    t = Table(title="gemmaquant schemes")
    for col in ("scheme", "format", "engine", "what"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["scheme"], r["format"], r["engine"], r["what"])
    out.print(t)


def _register_extra_commands():
    """Commands whose modules carry their own option definitions."""
    from .compare_cli import compare_cmd
    from .inspect_cli import inspect_cmd

    app.command("inspect")(inspect_cmd)
    app.command("compare")(compare_cmd)


_register_extra_commands()


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main():
    signal.signal(signal.SIGTERM, _on_sigterm)  # SIGTERM cleans up like Ctrl-C
    # A shell without job control starts background jobs with SIGINT ignored, and Python then never
    # raises KeyboardInterrupt: restore it so an interrupt always removes partial output.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rv = app(standalone_mode=False)
        if rv == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt into Exit(130) and returns its code
            raise KeyboardInterrupt
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except GemmaQuantError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: nothing was left at the output path")
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
