"""The `gemmaquant` command line: each command parses, calls the library, renders with rich."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .options import COMPILE_HELP, QUANT_COMPILE_HELP, TEXT_HELP, path_arg, set_compile
from ..errors import EXIT_INTERRUPTED, GemmaQuantError
from ..schemes import ALGORITHMS

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


def _check_reports(reports: dict, force: bool, inputs: list) -> None:
    """The output guard on each report path given ({option: path}; '-' is stdout), before any work."""
    from ..export.guard import check_output

    for option, path in reports.items():
        if path is not None and str(path) != "-":
            check_output(path, force=force, kind="file", inputs=inputs, option=option)


def _write_json(path: Optional[Path], data: dict, force: bool = False, inputs=()):
    if path is None:
        return
    text = json.dumps(data, indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        from ..export.atomic import write_report

        write_report(path, text, force=force, inputs=inputs, option="--json")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="HF model directory, Hugging Face repo id, or 'demo'."),
    text: Optional[Path] = typer.Option(None, "--text", help=TEXT_HELP, parser=path_arg("--text")),
    ctx: int = typer.Option(512, "--ctx", help="Chunk length in tokens (llama-perplexity's -c): even, 8 up to the model's context."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Evaluate at most N chunks, N >= 1 (default: all)."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (1-1024)."),
    compile_: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON to PATH ('-' for stdout).",
                                             parser=path_arg("--json")),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
):
    """Perplexity of MODEL on a text, by llama-perplexity's method (ppl ± stderr, tokens/s)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..evaluate.artifact import model_info
    from ..evaluate.eval_model import open_for_eval
    from ..formats.inputs import check_input_file
    from ..limits import check_for_model, check_numbers
    from ..formats.texts import eval_text

    check_numbers(ctx=ctx, chunks=chunks, threads=threads, device=device, dtype=dtype)
    if text is not None:
        check_input_file(text, "--text")
    cfg, model_path = model_info(model)
    check_for_model(cfg, model, ctx=ctx)
    src = eval_text(text)  # checked (UTF-8, not empty) and hashed, streaming, before the model loads
    inputs = [model_path, src.path]
    _check_reports({"--json": json_path}, force, inputs)
    _set_threads(threads)
    set_compile(compile_)
    runner = open_for_eval(model, dtype=dtype, device=device)
    chunk_ids = runner.chunks(src, ctx, chunks)
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                  TimeRemainingColumn(), console=err, disable=quiet, transient=True) as bar:
        task = bar.add_task("eval", total=len(chunk_ids))
        res = runner.perplexity(chunk_ids, progress=lambda i: bar.update(task, completed=i))
    data = {"model": model, **src.to_dict(), "dtype": str(runner.dtype).replace("torch.", ""),
            "device": device, **res.to_dict()}
    if compile_:
        from ..numerics.compiling import compiled_types

        data["compiled_dequant"] = compiled_types()  # the types whose compiled kernel ran
    _write_json(json_path, data, force, inputs)
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
    scheme: Optional[str] = typer.Option(None, "--scheme", "-s", help="Scheme or GGUF preset (see `gemmaquant schemes`); "
                                         "several GGUF presets: q8_0,q6_k,q4_k_m with --out DIR/ (one read of MODEL for all)."),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (safetensors) or FILE.gguf. Default: a name that encodes the scheme.",
                                            parser=path_arg("--out")),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A shipped recipe name or a .toml path (see `gemmaquant recipes`)."),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", help=f"{', '.join(ALGORITHMS)} (which apply: `gemmaquant schemes`)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text, a regular UTF-8 file (default: built-in mixed text).",
                                         parser=path_arg("--calib")),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration samples (default 128)."),
    calib_len: Optional[int] = typer.Option(None, "--calib-len", help="Tokens per calibration sample, 2 up to the model's context (default 512)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="SmoothQuant migration strength, 0..1 (default 0.8)."),
    imatrix: Optional[bool] = typer.Option(None, "--imatrix/--no-imatrix", help="GGUF: compute an importance matrix from calibration text."),
    imatrix_file: Optional[Path] = typer.Option(None, "--imatrix-file", help="GGUF: use a llama.cpp imatrix file (GGUF or legacy .dat).",
                                                parser=path_arg("--imatrix-file")),
    force: bool = typer.Option(False, "--force", help="Replace an existing output: a file by a file, or one of gemmaquant's own "
                                                      "output directories (never the model, nor a directory gemmaquant did not write)."),
    card: bool = typer.Option(False, "--card", help="GGUF: also write README.md beside the file, a Hub model card (a "
                              "second GGUF in the same folder joins it). compressed-tensors directories always get one."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="The Hub repo id of MODEL, for the card's "
                                             "base_model when it cannot be derived (a local copy of a Hub repo)."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="GGUF: choose each tensor's type by measured "
                                               "sensitivity so that the tensor data takes at most this many bits per weight."),
    target_size: Optional[str] = typer.Option(None, "--target-size", help="GGUF: the same for a whole-file size "
                                              "(1.2GB, 900MiB, bytes); the file is at most this big. 'preset': "
                                              "the size of the file --scheme alone writes (llama.cpp's)."),
    mmproj: Optional[str] = typer.Option(None, "--mmproj", help="GGUF of a multimodal Gemma 3 or 4: type of the "
                                         "vision (and audio) towers' mmproj file written beside it as "
                                         "mmproj-<name>-<TYPE>.gguf (f16 default, bf16, q8_0, f32), or none."),
    keep_dtype: bool = typer.Option(False, "--keep-dtype", help="compressed-tensors: copy a float32/float16 source's "
                                    "embedding and norms as they are (default: bfloat16, the dtype vLLM runs Gemma in)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (tensors grouped by role, types, estimated size); write nothing."),
    show_all: bool = typer.Option(False, "--all", help="With --dry-run: one row per tensor instead of per role."),
    device: str = typer.Option("cpu", "--device", help="Device for calibration passes (cpu, cuda, cuda:N)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (1-1024)."),
    compile_: bool = typer.Option(False, "--compile", help=QUANT_COMPILE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
):
    """Quantize MODEL to a vLLM safetensors directory or a llama.cpp GGUF file."""
    from ..formats.checkpoint import resolve_model
    from ..formats.hub import valid_repo_id
    from ..formats.inputs import check_input_file
    from ..limits import check_numbers
    from ..pipeline import QuantizeOptions, check_family, check_source, default_output, run_quantize
    from ..recipes import load_recipe
    from ..schemes import get_scheme

    check_numbers(calib_samples=calib_samples, calib_len=calib_len, alpha=alpha, threads=threads, device=device)
    settings: dict = {}
    read = []  # files read besides the model and --calib/--imatrix-file: the output never replaces them
    if recipe:
        r = load_recipe(recipe)
        settings = dict(r.settings)
        read.append(r.path)
        if scheme and get_scheme(scheme).name != r.scheme.name:
            raise GemmaQuantError(f"--scheme {scheme} contradicts recipe {r.name} (scheme {r.scheme.name})")
        scheme = r.scheme.name
    if not scheme:
        raise GemmaQuantError("give --scheme or --recipe (schemes: see `gemmaquant schemes`)")
    several = [get_scheme(n.strip()) for n in scheme.split(",") if n.strip()] if "," in scheme else None
    if several is not None and recipe:
        raise GemmaQuantError("--recipe names one scheme; give several GGUF presets with --scheme a,b,c alone")
    s = several[0] if several else r.scheme if recipe else get_scheme(scheme)  # a recipe's group size / ignore
    if several is None:
        check_family(s, out_path)
    explicit = dict(algorithm=algorithm, calib=calib, calib_samples=calib_samples, calib_len=calib_len,
                    alpha=alpha, imatrix=imatrix)
    settings.update({k: v for k, v in explicit.items() if v is not None})
    if settings.get("calib") is not None:
        settings["calib"] = check_input_file(settings["calib"], "--calib")
    if imatrix_file is not None:
        check_input_file(imatrix_file, "--imatrix-file")
    if base_model is not None and not valid_repo_id(base_model):
        raise GemmaQuantError(f"--base-model {base_model!r}: expected a Hugging Face repo id such as google/gemma-3-270m")
    _set_threads(threads)
    set_compile(compile_)
    opts = QuantizeOptions(imatrix_file=imatrix_file, force=force, device=device, inputs=tuple(read), card=card,
                           base_model=base_model, target_bpw=target_bpw, target_size=target_size,
                           keep_dtype=keep_dtype, mmproj=mmproj,
                           command="gemmaquant " + " ".join(sys.argv[1:]), **settings)
    ckpt = resolve_model(model)
    check_source(ckpt)
    if several is not None:
        _quantize_set(ckpt, several, out_path or Path("."), opts, dry_run, show_all, json_out, quiet)
        return
    out_p = out_path or default_output(ckpt, s)
    if dry_run:
        from .plan_view import render_plan

        render_plan(ckpt, s, out_p, opts, out, json_out, show_all=show_all)
        return
    from .progress import byte_task, progress_display, steps_task

    with progress_display(not (quiet or json_out), console=err) as bar:
        summary = run_quantize(ckpt, s, out_p, opts, progress=byte_task(bar, f"writing {s.label}"),
                               calib_progress=steps_task(bar))
    if json_out:
        sys.stdout.write(json.dumps(summary.to_dict(), indent=2) + "\n")
    elif not quiet:
        from .plan_view import render_summary

        render_summary(summary, out)


def _quantize_set(ckpt, schemes, out_dir, opts, dry_run, show_all, json_out, quiet) -> None:
    """`quantize --scheme a,b,c --out DIR/`: one GGUF per preset, named as the single-preset command names it,
    all written in one pass over the checkpoint."""
    from ..pipeline import gguf_set_outputs, run_quantize_set

    outs = gguf_set_outputs(ckpt, schemes, out_dir)
    if dry_run:
        from .plan_view import render_plan

        for s, o in zip(schemes, outs):
            render_plan(ckpt, s, o, opts, out, json_out, show_all=show_all)
        return
    from .progress import byte_task, progress_display, steps_task

    with progress_display(not (quiet or json_out), console=err) as bar:
        # one bar for the set: each source byte is read once and feeds every file
        label = f"writing {len(schemes)} files ({', '.join(s.label for s in schemes)})"
        summaries = run_quantize_set(ckpt, schemes, out_dir, opts, byte_task(bar, label),
                                     calib_progress=steps_task(bar))
    if json_out:
        sys.stdout.write(json.dumps([x.to_dict() for x in summaries], indent=2) + "\n")
    elif not quiet:
        from .plan_view import render_summary

        for summary in summaries:
            render_summary(summary, out)


@app.command("imatrix")
def imatrix_cmd(
    model: str = typer.Argument(..., help="HF model directory, Hugging Face repo id, or 'demo'."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Output imatrix file (llama.cpp GGUF imatrix format).",
                                  parser=path_arg("--out")),
    calib: Optional[Path] = typer.Option(None, "--calib", "--text",
                                         help="Calibration text, a regular UTF-8 file (default: the built-in calibration "
                                              "text, prose, code, chat turns and several languages).",
                                         parser=path_arg("--calib")),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration samples (1 or more)."),
    calib_len: int = typer.Option(512, "--calib-len", help="Tokens per sample, 2 up to the model's context."),
    llama_chunks_: bool = typer.Option(
        False, "--llama-chunks",
        help="Cut the text as llama-imatrix does: consecutive --calib-len chunks of the whole text "
             "(first token of each overwritten by BOS), at most --calib-samples; gives llama-imatrix's "
             "statistics for the same text (run it with --parse-special)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file (never a directory or an input)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (1-1024)."),
):
    """Compute an importance matrix with the built-in forward pass and save it as llama.cpp does."""
    from ..formats.checkpoint import resolve_model
    from ..export.atomic import atomic_output
    from ..export.guard import check_output
    from ..calib.imatrix import compute_imatrix, llama_chunks
    from ..formats.inputs import check_input_file
    from ..limits import check_for_model, check_numbers
    from ..calib.data import calib_text

    check_numbers(calib_samples=calib_samples, calib_len=calib_len, threads=threads)
    if calib is not None:
        check_input_file(calib, "--calib")
    _set_threads(threads)
    ckpt = resolve_model(model)
    src = calib_text(calib)  # checked (UTF-8, not empty) and hashed, streaming, before the model loads
    inputs = [ckpt.path, src.path]
    check_output(out_path, force=force, kind="file", inputs=inputs)
    check_for_model(ckpt.config, str(ckpt.path), calib_samples=calib_samples, calib_len=calib_len)
    ids = dataset = None
    if llama_chunks_:
        from ..calib.data import load_tokenizer_for

        tok = load_tokenizer_for(ckpt.path, rows=ckpt.config.vocab_size)
        if tok.bos_id is None:
            raise GemmaQuantError(f"{tok.source}: the tokenizer has no BOS token to add")
        # with BOS, as llama-imatrix tokenizes; read only the chunks' worth of the text
        tok_ids = [tok.bos_id, *src.encode(lambda t: tok.encode(t, add_bos=False, parse_special=True),
                                           need=calib_samples * calib_len).ids]
        try:
            ids = llama_chunks(tok_ids, calib_len, ckpt.config.bos_token_id, calib_samples)
        except ValueError as e:
            raise GemmaQuantError(f"{calib or 'the default calibration text'}: {e} (--calib-len)") from None
        dataset = str(calib) if calib is not None else "default_calib.txt"
    from .progress import progress_display, steps_task

    with progress_display(console=err) as bar:
        im = compute_imatrix(ckpt, calib=calib, n_samples=calib_samples, seq_len=calib_len, ids=ids, dataset=dataset,
                             progress=steps_task(bar))
    with atomic_output(out_path, force=force, kind="file", inputs=inputs) as tmp:
        im.save(tmp)
    out.print(f"wrote {out_path}: {len(im.sums)} entries from {im.describe()}; text {src.describe()}",
              highlight=False, soft_wrap=True)
    if im.expert_report():
        out.print(im.expert_report(), highlight=False, soft_wrap=True)


@app.command("recipes")
def recipes_cmd(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """List the shipped recipes (use with `gemmaquant quantize MODEL --recipe NAME`)."""
    from ..recipes import load_recipe, shipped_recipes

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
    from ..schemes import scheme_markdown, scheme_table

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
    t.add_column("bpw (demo)", justify="right")
    for r in rows:
        t.add_row(r["scheme"], r["format"], r["engine"], r["what"],
                  f"{r['demo_bpw']:.2f}" if r["demo_bpw"] is not None else "")
    out.print(t)


def _register_extra_commands():
    """Commands whose modules carry their own option definitions."""
    from .compare import compare_cmd
    from .inspect import inspect_cmd

    app.command("inspect")(inspect_cmd)
    app.command("compare")(compare_cmd)


_register_extra_commands()


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


class _NoteHandler(logging.Handler):
    """The library's warnings (logger "gemmaquant": a text read only in part, leftovers of a killed
    run cleaned up) as `note:` lines on stderr."""

    def emit(self, record):
        try:
            err.print(f"[yellow]note:[/] {record.getMessage()}", highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - a closed terminal must not turn a note into a traceback
            pass


def _setup_notes() -> None:
    log = logging.getLogger("gemmaquant")
    if not any(isinstance(h, _NoteHandler) for h in log.handlers):
        log.addHandler(_NoteHandler(logging.WARNING))


def _say(text: str) -> None:
    try:
        err.print(text, highlight=False, soft_wrap=True)
    except Exception:  # noqa: BLE001 - stderr gone (SIGHUP closed the terminal): the exit code still tells
        pass


def main():
    # SIGTERM and SIGHUP (the terminal closed) clean up like Ctrl-C: no partial output is left
    signal.signal(signal.SIGTERM, _on_sigterm)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _on_sigterm)
    # A shell without job control starts background jobs with SIGINT ignored, and Python then never
    # raises KeyboardInterrupt: restore it so an interrupt always removes partial output.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _setup_notes()
    try:
        rv = app(standalone_mode=False)
        if rv == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt into Exit(130) and returns its code
            raise KeyboardInterrupt
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except GemmaQuantError as e:
        _say(f"[bold red]error:[/] {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _say("[bold red]interrupted[/]: nothing was left at the output path")
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # usage errors (bad or missing option values) come through here
        _usage_error(e)
        raise


def _usage_error(e: Exception) -> None:
    """A usage error as one `error:` line with its exit code (2); typer >= 0.29 raises its own
    vendored click exceptions (typer.TyperException), which `click.ClickException` does not catch,
    so `--threads 2.5` or a missing --text used to end in a traceback. No arguments: the help."""
    kinds = tuple(k for k in (getattr(typer, "TyperException", None), _click_exception()) if k is not None)
    if not isinstance(e, kinds):
        return
    if type(e).__name__ == "NoArgsIsHelpError":  # the help text, on stderr, exit 2 (click's choice)
        e.show()
        sys.exit(getattr(e, "exit_code", 2))
    _say(f"[bold red]error:[/] {e.format_message()}")
    sys.exit(getattr(e, "exit_code", 2) or 2)


def _click_exception():
    try:
        import click
    except ImportError:
        return None
    return click.ClickException


if __name__ == "__main__":  # pragma: no cover
    main()
