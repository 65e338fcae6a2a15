"""The quantize pipeline: load → (calibrate) → write → verify, for both output families.

    checkpoint ──► calibrate (calibrated schemes, --imatrix) ──► compressed-tensors writer ─► DIR/
                                                          └──► GGUF writer ──────────────► FILE.gguf
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from .formats.checkpoint import Checkpoint
from .errors import GemmaQuantError
from .schemes import SCHEMES, Scheme


@dataclass
class QuantizeOptions:
    algorithm: str | None = None
    calib: Path | None = None
    calib_samples: int = 128
    calib_len: int = 512
    alpha: float = 0.8
    imatrix: bool = False
    imatrix_file: Path | None = None
    force: bool = False
    device: str = "cpu"
    command: str = ""
    inputs: tuple = ()  # other files the command read (the recipe): never replaced by the output
    card: bool = False  # GGUF: write/extend the folder's README.md model card (compressed-tensors: always)
    base_model: str | None = None  # the Hub repo id the source is, when it cannot be derived
    target_bpw: float | None = None  # GGUF: per-tensor types for a size budget (export/gguf/optimized.py)
    target_size: str | None = None
    keep_dtype: bool = False  # compressed-tensors: copy an f32/f16 source's tensors as they are, not in bf16
    mmproj: str | None = None  # GGUF of a multimodal model: the mmproj type (None: f16; "none": no mmproj)

    @property
    def tuned(self) -> bool:
        """GGUF bytes other than llama-quantize's preset: gptq codes and/or a budgeted type mix."""
        return self.algorithm == "gptq" or self.target_bpw is not None or self.target_size is not None


@dataclass
class QuantizeSummary:
    output: Path
    scheme: str
    family: str
    seconds: float
    output_bytes: int
    source_bytes: int
    params: int
    bits_per_weight: float
    peak_rss_bytes: int
    notes: list[str] = field(default_factory=list)
    unquantized: list[tuple[str, str]] = field(default_factory=list)  # (tensor, why)
    types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"output": str(self.output), "scheme": self.scheme, "format": self.family,
                "seconds": round(self.seconds, 3), "output_bytes": self.output_bytes,
                "source_bytes": self.source_bytes, "params": self.params,
                "bits_per_weight": round(self.bits_per_weight, 4), "peak_rss_bytes": self.peak_rss_bytes,
                "notes": self.notes, "unquantized": [{"tensor": t, "why": w} for t, w in self.unquantized],
                "tensor_types": self.types}


# 4-bit weights depend most on what they were calibrated on (benchmarks/RESULTS.md, "what the calibration
# text is worth": w4a16 GPTQ on the demo, KL 0.30 → 0.15 and top-1 0.73 → 0.82 vs bf16 with held-out text of
# the evaluated kind instead of the built-in generic one).
CALIB_HINT = ("calibrated on the built-in generic text: for 4-bit weights, --calib FILE with text like what the "
              "model will serve halved the KL drift on the demo model")


def model_stem(ckpt: Checkpoint) -> str:
    """The model's name in output names and card titles: gemma-2-2b-it (the demo: gemma-3-270m)."""
    return "gemma-3-270m" if ckpt.source == "demo" else ckpt.name


def default_output(ckpt: Checkpoint, scheme: Scheme) -> Path:
    """gemma-2-2b-it.Q6_K.gguf / gemma-2-9b-it-FP8-dynamic (in the current directory)."""
    name = model_stem(ckpt)
    if scheme.is_gguf:
        return Path(f"{name}.{scheme.label}.gguf")
    return Path(f"{name}-{scheme.label}")


def check_family(scheme: Scheme, out: Path | None) -> None:
    if out is not None and out.suffix == ".gguf" and not scheme.is_gguf:
        gguf = ", ".join(s.name for s in SCHEMES.values() if s.is_gguf)
        raise GemmaQuantError(f"{out}: a .gguf output needs a GGUF scheme, not '{scheme.name}' (GGUF schemes: {gguf})")


def peak_rss() -> int:
    """This process's peak resident memory (Linux VmHWM; ru_maxrss elsewhere, which may include the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def kept_why(name: str, vision: bool = False) -> str:
    """Why the compressed-tensors writer copies a tensor unquantized (plan rows, the summary)."""
    if vision:
        return "vision/audio tower / projector: unquantized, in `ignore`"
    if "embed_tokens" in name:
        return ("per-layer-input table: kept" if "per_layer" in name
                else "embedding / tied LM head: kept in the source dtype (vLLM cannot quantize it)")
    if "router.proj" in name:
        return "MoE router: unquantized (vLLM runs it in float32 without a quant method), in `ignore`"
    if "per_layer_model_projection" in name:
        return "per-layer-input model projection: unquantized, in `ignore`"
    if name.endswith(("router.scale", "per_expert_scale", "layer_scalar")):
        return "router / layer scale: copied byte for byte"
    return "norm: copied byte for byte"


def ct_plan(ckpt: Checkpoint, scheme: Scheme) -> list[dict]:
    """One row per source tensor: what the compressed-tensors writer makes of it and its bytes (a MoE
    layer's fused experts: one row per projection, for its E per-expert Linears)."""
    from .export.compressed_tensors import check_plan
    from .export.ct_rules import recipe_ignores
    from .numerics.ct.formats import ct_format

    check_plan(ckpt, scheme)  # the refusals the run would make (group sizes, MoE kernel shapes)
    cfg = ckpt.config
    w, fmt = scheme.weights, ct_format(scheme.ct_format)
    rows = []
    linears = {f"model.layers.{i}.{s}.weight" for i in range(cfg.num_hidden_layers) for s in cfg.linear_shapes(i)}
    for name, shape in cfg.expected_shapes().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            layer = int(name.split(".")[2])
            for suffix, (src, rows_of, (n, k)) in cfg.expert_linears(layer).items():
                if suffix.startswith("experts.0.") and name.endswith(src):
                    t, b = fmt.plan_row(n, k, w, scheme.input_activations)
                    proj = suffix.split(".")[-1]
                    rows.append({"tensor": f"model.layers.{layer}.experts.*.{proj}.weight",
                                 "shape": [cfg.num_experts, n, k], "type": t, "bytes": cfg.num_experts * b,
                                 "note": f"{cfg.num_experts} per-expert Linears: rows {rows_of.start}-"
                                         f"{rows_of.stop - 1} of each expert's {src.split('.')[1]}"})
            continue
        if name not in linears or recipe_ignores(scheme, name[:-7], ckpt.stored_name(name)[:-7]):
            why = kept_why(name) if name not in linears else "recipe's `ignore`: unquantized Linear"
            rows.append({"tensor": name, "shape": list(shape), "type": str(ckpt.dtype(name)).replace("torch.", ""),
                         "bytes": ckpt.raw_bytes(name).nbytes, "note": why})
            continue
        n, k = shape
        t, b = fmt.plan_row(n, k, w, scheme.input_activations)
        rows.append({"tensor": name, "shape": list(shape), "type": t, "bytes": b, "note": ""})
    for name in ckpt.vision_names():  # multimodal: copied unquantized
        rows.append({"tensor": name, "shape": list(ckpt.shape(name)), "type": str(ckpt.dtype(name)).replace("torch.", ""),
                     "bytes": ckpt.raw_bytes(name).nbytes, "note": kept_why(name, vision=True)})
    return rows


def gguf_plan(ckpt: Checkpoint, scheme: Scheme, has_imatrix: bool) -> list[dict]:
    from .export.gguf.plan import plan_types
    from .numerics.ggml.types import row_bytes

    rows = []
    for p in plan_types(ckpt.config, scheme, has_imatrix, has_lm_head="lm_head.weight" in ckpt.names()):
        n_rows = p.numel // p.n_per_row
        rows.append({"tensor": p.name, "shape": list(p.shape), "type": p.type.name,
                     "bytes": n_rows * row_bytes(p.type, p.n_per_row), "note": p.reason})
    return rows


def plan_rows(ckpt: Checkpoint, scheme: Scheme, opts: QuantizeOptions) -> list[dict]:
    """`quantize --dry-run`'s rows: the preset's plan, or a size budget's (which takes the sensitivity
    pass on the calibration text, so the plan shown is the one the run writes)."""
    from .export.gguf.optimized import dry_run_rows

    rows = dry_run_rows(ckpt, scheme, opts)  # also refuses what the run would refuse
    if rows is not None:
        return rows
    return gguf_plan(ckpt, scheme, bool(opts.imatrix or opts.imatrix_file)) if scheme.is_gguf \
        else ct_plan(ckpt, scheme)


def estimate_output_bytes(ckpt: Checkpoint, scheme: Scheme, opts: QuantizeOptions) -> int:
    """The output's size, an upper bound within ~100 KB: tensor data from the --dry-run plan (exact);
    the side files (tokenizer, configs) that a compressed-tensors directory copies and that bound a
    GGUF's vocab metadata; per GGUF tensor its info record and alignment padding; 64 KiB for the
    remaining metadata, model card and index."""
    rows = gguf_plan(ckpt, scheme, bool(opts.imatrix or opts.imatrix_file)) if scheme.is_gguf \
        else ct_plan(ckpt, scheme)
    per_tensor = 256 if scheme.is_gguf else 0  # name + dims + type + offset, ≤ 31 bytes of padding
    data = sum(r["bytes"] for r in rows)
    if scheme.is_gguf and opts.tuned:
        # a budget may exceed the preset (--target-size preset: the plan's own size, `data`); gptq
        # patches a template copy beside the output, and parks XᵀX there (calib/ggml_calibrate.py)
        from .export.gguf.optimized import make_budget

        budget = make_budget(opts.target_bpw, opts.target_size)
        if budget is not None:
            data = max(data, int((budget.bpw or 0) * ckpt.config.param_count() / 8), budget.size or 0)
        if opts.algorithm == "gptq":  # the template, and the wide inputs' XᵀX parked beside it
            from .calib.ggml_calibrate import parked_bytes

            data = 2 * data + parked_bytes(ckpt)
    return (data + per_tensor * len(rows) + sum(p.stat().st_size for p in ckpt.side_files()) + (64 << 10))


def check_source(ckpt: Checkpoint) -> None:
    """A source that is already quantized is refused, whatever the scheme (weights in F8/int dtypes
    are refused by the checkpoint reader; a quantization_config marks the rest)."""
    qc = ckpt.config.raw.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise GemmaQuantError(f"{ckpt.path}: config.json has a quantization_config (quant_method {method!r}): the "
                              "checkpoint is already quantized; quantize its bf16/f16/f32 original instead")


def mmproj_target(ckpt: Checkpoint, scheme: Scheme, opts: QuantizeOptions, out: Path) -> tuple[str, Path] | None:
    """(type, path) of the mmproj written beside a GGUF output of a multimodal checkpoint, named as
    llama.cpp's converter names it (mmproj-<name>-<TYPE>.gguf in the output's folder); None when none is."""
    from .export.gguf.mmproj import DEFAULT_OUTTYPE, OUTTYPES, default_mmproj_path

    asked = opts.mmproj
    if asked is not None and asked != "none" and asked not in OUTTYPES:
        raise GemmaQuantError(f"--mmproj {asked!r} is not supported (allowed: {', '.join(OUTTYPES)}, none)")
    if asked not in (None, "none") and not (scheme.is_gguf and ckpt.config.multimodal):
        why = "a GGUF scheme" if not scheme.is_gguf else \
            "a multimodal checkpoint (Gemma3ForConditionalGeneration or Gemma4ForConditionalGeneration)"
        raise GemmaQuantError(f"--mmproj {asked}: the vision tower's GGUF needs {why}")
    if asked == "none" or not (scheme.is_gguf and ckpt.config.multimodal):
        return None
    t = asked or DEFAULT_OUTTYPE
    return t, default_mmproj_path(ckpt, t, Path(out).absolute().parent)


def calibrates(scheme: Scheme, algorithm: str | None) -> bool:
    """Whether a compressed-tensors run needs activations: static input scales, or an algorithm other
    than round-to-nearest (the scheme's default when none is asked; `--algorithm rtn` on int8 rounds
    to nearest with dynamic activations: nothing to calibrate)."""
    if algorithm is None:
        return scheme.needs_calibration
    ia = scheme.input_activations
    return algorithm != "rtn" or (ia is not None and not ia.dynamic)


def inputs_of(ckpt: Checkpoint, opts: QuantizeOptions) -> list:
    """Every path a quantize run reads: the output guard keeps the output off all of them."""
    return [ckpt.path, opts.calib, opts.imatrix_file, *opts.inputs]


def run_quantize(ckpt: Checkpoint, scheme: Scheme, out: Path, opts: QuantizeOptions,
                 progress=None, computed_imatrix=None, calib_progress=None) -> QuantizeSummary:
    """Write `out`. `progress(done, total, tensor)` hears of the source bytes written, `calib_progress(done,
    total, what)` of the layers of each calibration pass (imatrix, GPTQ/AWQ/SmoothQuant, sensitivity);
    the caller renders them (cli/progress.py)."""
    from .export.diskspace import check_free_space
    from .export.guard import check_output
    from .export.gguf.optimized import check_request, make_budget
    from .limits import check_for_model

    t0 = time.perf_counter()
    check_family(scheme, out)
    check_request(scheme, opts.algorithm, make_budget(opts.target_bpw, opts.target_size), bool(opts.imatrix_file))
    check_source(ckpt)
    # the output guard before any calibration time (the writers apply it again when they start)
    check_output(out, force=opts.force, kind="file" if scheme.is_gguf else "dir", inputs=inputs_of(ckpt, opts))
    mmproj = mmproj_target(ckpt, scheme, opts, out)
    mmproj_kept, mmproj_bytes = False, 0
    if mmproj is not None:
        from .export.gguf.mmproj import check_mmproj, same_mmproj

        # a second preset written into the same folder shares the mmproj an earlier one wrote
        mmproj_kept = not opts.force and mmproj[1].exists() and same_mmproj(mmproj[1], ckpt, mmproj[0])
        if not mmproj_kept:
            check_output(mmproj[1], force=opts.force, kind="file", inputs=inputs_of(ckpt, opts), option="--mmproj")
            # its refusals (no image normalization, towers llama.cpp cannot run) before the text GGUF is written
            mmproj_bytes = sum(t.nbytes for t in check_mmproj(ckpt, mmproj[0]))
    calibrating = bool(opts.imatrix) or opts.tuned if scheme.is_gguf else calibrates(scheme, opts.algorithm)
    text = None
    if not scheme.is_gguf:  # a group size that does not divide a Linear fails now, not after calibrating
        from .export.compressed_tensors import check_plan

        check_plan(ckpt, scheme)
    if calibrating:  # the calibration settings only bind when calibration runs
        from .calib.data import calib_text

        check_for_model(ckpt.config, str(ckpt.path), calib_samples=opts.calib_samples, calib_len=opts.calib_len)
        text = calib_text(opts.calib)  # the text checked (UTF-8, not empty) and named before the model loads
    check_free_space(out, estimate_output_bytes(ckpt, scheme, opts) + mmproj_bytes)
    if scheme.is_gguf:
        summary = _gguf(ckpt, scheme, out, opts, progress, text, mmproj, mmproj_kept, computed_imatrix,
                        calib_progress)
    else:
        summary = _compressed_tensors(ckpt, scheme, out, opts, progress, text, calib_progress)
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_bytes = peak_rss()
    return summary


def _mmproj(ckpt, opts, summary, mmproj, kept) -> None:
    """Write (or keep) the mmproj beside the GGUF and say so in the summary (and so in the card)."""
    from .export.gguf.mmproj import mmproj_contents, write_mmproj

    if kept:
        summary.notes.append(f"{mmproj_contents(ckpt)}: {mmproj[1].name} (beside it) already holds this model's "
                             f"{mmproj[0].upper()} mmproj (kept; --force rewrites it)")
    elif mmproj is not None:
        rep = write_mmproj(ckpt, mmproj[0], mmproj[1], force=opts.force, inputs=inputs_of(ckpt, opts)[1:])
        summary.notes.append(f"{mmproj_contents(ckpt)}: {rep.path.name} beside it ({mmproj[0].upper()}, {len(rep.tensors)} "
                             f"tensors, {rep.file_bytes / 1e6:.1f} MB; load it with --mmproj in llama.cpp)")
    elif ckpt.config.multimodal:
        summary.notes.append(f"{'vision/audio towers' if ckpt.config.generation == 4 else 'vision tower'} not written "
                             "(--mmproj none): the GGUF is the text model only")


def gguf_set_outputs(ckpt: Checkpoint, schemes: list[Scheme], out_dir: Path) -> list[Path]:
    """Where `--scheme a,b,c --out DIR/` writes: each file named as the single-preset command names it."""
    if not schemes:
        raise GemmaQuantError("--scheme: a comma-separated list needs at least one GGUF preset")
    bad = [s.name for s in schemes if not s.is_gguf]
    if bad:
        raise GemmaQuantError(f"--scheme: several schemes at once are GGUF presets only, not {', '.join(bad)}")
    names = [s.name for s in schemes]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise GemmaQuantError(f"--scheme: preset {dup} is listed twice")
    if out_dir.suffix == ".gguf" or out_dir.is_file():
        raise GemmaQuantError(f"--out {out_dir}: several presets need a directory to write their files into")
    return [out_dir / default_output(ckpt, s).name for s in schemes]


def run_quantize_set(ckpt: Checkpoint, schemes: list[Scheme], out_dir: Path, opts: QuantizeOptions,
                     progress=None, calib_progress=None) -> list[QuantizeSummary]:
    """Several GGUF presets in one command, from one read of the checkpoint: every output passes the
    output guard and every preset its imatrix refusal before any work, the importance matrix is computed
    once, each source tensor is read, converted and quantized once per distinct type (`write_gguf_set`),
    and each file is the single-preset command's file. With `opts.card`, one model card lists them all.
    `progress(done, total, tensor)` hears of the source bytes written (once for the whole set);
    `calib_progress` as run_quantize's. Tuned files (--algorithm gptq, a size budget) calibrate per preset:
    those are written one after the other."""
    from .export.diskspace import check_free_space
    from .export.guard import check_output
    from .export.gguf.optimized import check_request
    from .export.gguf.plan import plan_types

    t0 = time.perf_counter()
    outs = gguf_set_outputs(ckpt, schemes, out_dir)
    check_source(ckpt)
    has_imatrix = bool(opts.imatrix or opts.imatrix_file)
    if opts.imatrix and opts.imatrix_file:
        raise GemmaQuantError("--imatrix (compute one) and --imatrix-file (read one) exclude each other")
    for s, out in zip(schemes, outs):
        check_request(s, opts.algorithm, None, bool(opts.imatrix_file))
        check_output(out, force=opts.force, kind="file", inputs=inputs_of(ckpt, opts))
        plan_types(ckpt.config, s, has_imatrix, has_lm_head="lm_head.weight" in ckpt.names())  # refusals now
    computed = None
    if opts.tuned:
        if opts.imatrix and not opts.imatrix_file:
            computed = _compute_imatrix(ckpt, opts, calib_progress)
        return [run_quantize(ckpt, s, out, opts, progress=progress, computed_imatrix=computed,
                             calib_progress=calib_progress) for s, out in zip(schemes, outs)]
    mmproj = mmproj_target(ckpt, schemes[0], opts, outs[0])  # one mmproj beside all of them
    mmproj_kept = False
    if mmproj is not None:
        from .export.gguf.mmproj import same_mmproj

        mmproj_kept = not opts.force and mmproj[1].exists() and same_mmproj(mmproj[1], ckpt, mmproj[0])
        if not mmproj_kept:
            check_output(mmproj[1], force=opts.force, kind="file", inputs=inputs_of(ckpt, opts), option="--mmproj")
    card = _card_target(ckpt, outs[0], opts)
    text = None
    if opts.imatrix:
        from .calib.data import calib_text
        from .limits import check_for_model

        check_for_model(ckpt.config, str(ckpt.path), calib_samples=opts.calib_samples, calib_len=opts.calib_len)
        text = calib_text(opts.calib)
    extra = 0
    if mmproj is not None and not mmproj_kept:
        from .export.gguf.mmproj import plan_mmproj

        extra = sum(t.nbytes for t in plan_mmproj(ckpt, mmproj[0]))
    check_free_space(out_dir, sum(estimate_output_bytes(ckpt, s, opts) for s in schemes) + extra)
    lossy = _lossy_notes(ckpt)
    header = None
    if not has_imatrix:  # the headers (one vocabulary read) build in their own process meanwhile
        from .export.gguf.header import start_header

        header = start_header(ckpt, list(schemes))
    try:
        if opts.imatrix and not opts.imatrix_file:
            computed = _compute_imatrix(ckpt, opts, calib_progress)
        imatrix, imatrix_meta, notes = _imatrix_of(ckpt, opts, text, computed)
        from .export.gguf.writer import GGUFOutput, write_gguf_set

        reps = write_gguf_set(ckpt, [GGUFOutput(s, out, imatrix, imatrix_meta) for s, out in zip(schemes, outs)],
                              force=opts.force, progress=progress, header=header, inputs=inputs_of(ckpt, opts)[1:])
    finally:
        if header is not None:
            header.close()
    summaries = []
    for s, out, rep in zip(schemes, outs, reps):
        summary = _gguf_summary(ckpt, s, out, rep, list(notes))
        summary.notes[:0] = lossy
        summary.notes.append(f"written with {len(schemes) - 1} other presets from one read of the source "
                             f"({', '.join(x.name for x in schemes)}); time and memory are the whole set's")
        summaries.append(summary)
    if mmproj is not None or ckpt.config.multimodal:
        _mmproj(ckpt, opts, summaries[0], mmproj, mmproj_kept)
        for summary in summaries[1:]:
            summary.notes.append(summaries[0].notes[-1])
    if card is not None:
        _gguf_card(ckpt, list(zip(schemes, outs, summaries)), opts, card[0])
    for summary in summaries:
        summary.seconds, summary.peak_rss_bytes = time.perf_counter() - t0, peak_rss()
    return summaries


def _compute_imatrix(ckpt, opts, calib_progress):
    from .calib.imatrix import compute_imatrix
    from .limits import check_for_model

    check_for_model(ckpt.config, str(ckpt.path), calib_samples=opts.calib_samples, calib_len=opts.calib_len)
    return compute_imatrix(ckpt, calib=opts.calib, n_samples=opts.calib_samples, seq_len=opts.calib_len,
                           device=opts.device, progress=calib_progress)


def _lossy_notes(ckpt) -> list[str]:
    """What the GGUF cannot hold of this checkpoint, warned before the work and kept in the summary."""
    import logging

    from .formats.gguf.fidelity import gguf_notes

    lossy = gguf_notes(ckpt.config, str(ckpt.path / "config.json"))
    for note in lossy:
        logging.getLogger("gemmaquant").warning(note)
    return lossy


def _card_target(ckpt, out, opts):
    """(the existing card data or None,) when --card is given, None otherwise; a README.md that is not
    ours is refused now, not after the work."""
    if not opts.card:
        return None
    from .export.guard import check_output
    from .export.model_card import card_location, gguf_card_target

    readme = card_location(out)[0]
    check_output(readme, force=True, kind="file", inputs=inputs_of(ckpt, opts), option="--card")
    return (gguf_card_target(readme, f"{model_stem(ckpt)}-GGUF"),)


def _gguf(ckpt, scheme, out, opts, progress, text=None, mmproj=None, mmproj_kept=False,
          computed_imatrix=None, calib_progress=None) -> QuantizeSummary:
    import logging

    from .formats.gguf.fidelity import gguf_notes

    if opts.imatrix and opts.imatrix_file:
        raise GemmaQuantError("--imatrix (compute one) and --imatrix-file (read one) exclude each other")
    # before the work: a user may rather stop here (a tuned run validates its budget first)
    lossy = gguf_notes(ckpt.config, str(ckpt.path / "config.json")) if opts.tuned else _lossy_notes(ckpt)
    card = _card_target(ckpt, out, opts)
    header = None
    if opts.tuned:
        summary = _gguf_tuned(ckpt, scheme, out, opts, progress, text, calib_progress)
        for note in lossy:
            logging.getLogger("gemmaquant").warning(note)
    else:
        if not (opts.imatrix or opts.imatrix_file):
            from .export.gguf.header import start_header

            # the header (mostly the vocabulary) builds in its own process while torch is imported here
            header = start_header(ckpt, scheme)
        try:
            if opts.imatrix and not opts.imatrix_file and computed_imatrix is None:
                computed_imatrix = _compute_imatrix(ckpt, opts, calib_progress)
            imatrix, imatrix_meta, notes = _imatrix_of(ckpt, opts, text, computed_imatrix)
            from .export.gguf.writer import write_gguf

            rep = write_gguf(ckpt, scheme, out, imatrix=imatrix, imatrix_meta=imatrix_meta, force=opts.force,
                             progress=progress, header=header, inputs=inputs_of(ckpt, opts)[1:])
        finally:
            if header is not None:
                header.close()
        summary = _gguf_summary(ckpt, scheme, out, rep, notes)
    summary.notes[:0] = lossy
    _mmproj(ckpt, opts, summary, mmproj, mmproj_kept)
    if card is not None:
        _gguf_card(ckpt, [(scheme, out, summary)], opts, card[0])
    return summary


def _gguf_card(ckpt, written, opts, existing) -> None:
    """Add these GGUFs [(scheme, path, summary)] to their folder's model card (a new card, or the one an
    earlier GGUF started), written once."""
    from .export.model_card import add_output, base_model_of, card_location, new_card, source_license, write_card

    readme = card_location(written[0][1])[0]
    card = existing or new_card(
        fmt="gguf", title=f"{model_stem(ckpt)}-GGUF",
        base_model=opts.base_model or base_model_of(ckpt.source, ckpt.path, ckpt.config.raw),
        source=ckpt.source, license=source_license(ckpt.path, ckpt.config.model_type),
        tags=["gemma", ckpt.config.model_type.replace("_text", ""), "gguf", "llama.cpp", "quantized", "gemmaquant"])
    for scheme, out, summary in written:
        add_output(card, {"file": card_location(out)[1], "scheme": scheme.name, "summary": scheme.summary,
                          "command": opts.command, "bytes": summary.output_bytes,
                          "bits_per_weight": summary.bits_per_weight, "types": summary.types,
                          "notes": [n for n in summary.notes if n], "tuned": opts.tuned})
    write_card(readme, card, inputs=inputs_of(ckpt, opts))
    for _, _, summary in written:
        summary.notes.append(f"model card: {readme}")


def _imatrix_of(ckpt, opts, text=None, computed=None) -> tuple[dict | None, dict | None, list[str]]:
    """(importance by GGUF tensor name, the imatrix keys' metadata, notes) of a GGUF run: read from
    --imatrix-file, or the one computed for --imatrix; (None, None, []) without."""
    from .formats.gguf.imatrix import expert_report, read_imatrix

    if opts.imatrix_file:
        im = read_imatrix(opts.imatrix_file)
        notes = [f"imatrix from {opts.imatrix_file} ({len(im.importance)} entries)"]
        experts = expert_report(im.expert_counts)
    elif opts.imatrix:
        im = computed.to_imatrix()
        named = f"; text {text.describe()}" if text is not None else ""
        notes = [f"imatrix computed by gemmaquant's forward pass on {computed.describe()}{named}"]
        experts = computed.expert_report()
    else:
        return None, None, []
    return im.importance, im.meta(), notes + ([experts] if experts else [])


def _gguf_summary(ckpt, scheme, out, rep, notes: list[str]) -> QuantizeSummary:
    """The summary of one written GGUF (`writer.Report`), after the imatrix notes."""
    if rep.imatrix_missing:
        m = rep.imatrix_missing
        notes.append(f"the imatrix has no entry for {len(m)} tensors, quantized without importance weights: "
                     + ", ".join(m[:4]) + (f" and {len(m) - 4} more" if len(m) > 4 else ""))
    params = sum(p.numel for p in rep.plans)
    unq = [(p.name, p.reason) for p in rep.plans if p.type.name == "F32"]  # norms, 1-D, Gemma 4 routers
    if rep.n_fallback:
        notes.append(f"{rep.n_fallback} tensors took llama.cpp's fallback type (row length not a multiple of 256)")
    return QuantizeSummary(output=out, scheme=scheme.name, family="gguf", seconds=0, output_bytes=rep.file_bytes,
                           source_bytes=ckpt.weight_nbytes(), params=params,
                           bits_per_weight=8 * rep.file_bytes / params, peak_rss_bytes=0, notes=notes,
                           unquantized=unq, types=rep.type_counts)


def _gguf_tuned(ckpt, scheme, out, opts, progress, text, calib_progress=None) -> QuantizeSummary:
    from .export.gguf.optimized import make_budget, write_tuned

    res = write_tuned(ckpt, scheme, out, opts, make_budget(opts.target_bpw, opts.target_size), text,
                      inputs=inputs_of(ckpt, opts)[1:], progress=progress, calib_progress=calib_progress)
    plans = res.report.plans
    params = sum(p.numel for p in plans)
    unq = [(p.name, p.reason) for p in plans if p.type.name == "F32"]
    return QuantizeSummary(output=out, scheme=scheme.name, family="gguf", seconds=0, output_bytes=res.file_bytes,
                           source_bytes=ckpt.weight_nbytes(), params=params,
                           bits_per_weight=8 * res.file_bytes / params, peak_rss_bytes=0, notes=res.notes,
                           unquantized=unq, types=res.types)


def _compressed_tensors(ckpt, scheme, out, opts, progress=None, text=None, calib_progress=None) -> QuantizeSummary:
    from .calib.pipeline import calibrate
    from .export.compressed_tensors import write_compressed_tensors

    if opts.imatrix or opts.imatrix_file:
        raise GemmaQuantError(f"--imatrix/--imatrix-file apply to GGUF schemes only, not {scheme.name}")
    from .calib.pipeline import check_algorithm

    algorithm = check_algorithm(scheme, opts.algorithm, False)
    needs = calibrates(scheme, opts.algorithm)
    quantized = overrides = input_scales = card_stats = None
    calibration_note = "none (round-to-nearest needs no data)"
    algo_note = "round-to-nearest (RTN), compressed-tensors min-max scales"
    notes = []
    if needs:
        if text is None:
            from .calib.data import calib_text

            text = calib_text(opts.calib)
        res = calibrate(ckpt, scheme, algorithm=algorithm, calib_path=opts.calib, n_samples=opts.calib_samples,
                        seq_len=opts.calib_len, alpha=opts.alpha, device=opts.device, progress=calib_progress)
        quantized = res.packed(scheme.ct_format) if res.quantized else None
        overrides = res.overrides or None
        input_scales = res.input_scales or None
        calibration_note = f"{opts.calib_samples} samples × {opts.calib_len} tokens of `{text.describe()}`"
        if res.expert_tokens.counts:  # a MoE: which experts the text reached, and how often
            calibration_note += "; " + res.expert_tokens.summary()
            card_stats = {"Calibration tokens routed to each MoE expert (per layer, experts 0…E-1)":
                          res.expert_tokens.table()}
        algo_note = _algorithm_note(algorithm, opts)
        notes.append(res.notes)
        if opts.calib is None and scheme.weights is not None and scheme.weights.num_bits <= 4:
            notes.append(CALIB_HINT)
    rep = write_compressed_tensors(ckpt, scheme, out, quantized=quantized, overrides=overrides,
                                   input_scales=input_scales, force=opts.force, command=opts.command,
                                   base_model=opts.base_model,
                                   algorithm_note=algo_note, calibration_note=calibration_note,
                                   actorder="weight" if algorithm in ("gptq", "awq+gptq") else None,
                                   inputs=inputs_of(ckpt, opts)[1:], keep_dtype=opts.keep_dtype, progress=progress,
                                   card_stats=card_stats)
    notes += rep.notes
    size = _size(out)
    params = ckpt.config.param_count()
    vision = set(ckpt.vision_names())
    unq = [(n, kept_why(n, n in vision)) for n in rep.copied]
    unq += [(n, "skipped (tied lm_head, identical to the embedding)") for n in rep.skipped]
    errs = list(rep.weight_error.values())
    if overrides:
        notes.append(f"{len(overrides)} norm tensors rewritten by scale folding (weights differ from the source "
                     "by design; measure the drift with `gemmaquant compare`)")
    elif errs:
        notes.append(f"relative weight error mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}")
    return QuantizeSummary(output=out, scheme=scheme.name, family="compressed-tensors", seconds=0,
                           output_bytes=size, source_bytes=ckpt.weight_nbytes(), params=params,
                           bits_per_weight=8 * size / params, peak_rss_bytes=0,
                           notes=notes + [algo_note],
                           unquantized=unq, types={f"{scheme.label} Linears": len(rep.quantized)})


# The summary's (and model card's) line per --algorithm, one for each name of schemes.ALGORITHMS; "rtn"
# is also what a scheme with static input scales and no algorithm gets.
ALGORITHM_NOTES = {
    "rtn": "round-to-nearest (RTN) with static input scales from calibration",
    "gptq": ("GPTQ (damping 0.01, static act-order, block 128, per-group MSE clip search, "
             "least-squares scale refit), no g_idx"),
    "awq": "AWQ-style activation-aware scale search (20-point grid), then RTN",
    "awq+gptq": "AWQ scale search, then GPTQ",
    "smoothquant": "SmoothQuant (alpha {alpha}) folded into the (1+w) norms / v_proj / up_proj, then RTN",
    "smoothquant+gptq": "SmoothQuant (alpha {alpha}) folded into the (1+w) norms / v_proj / up_proj, then GPTQ",
}


def _algorithm_note(algorithm: str | None, opts: QuantizeOptions) -> str:
    return ALGORITHM_NOTES[algorithm or "rtn"].format(alpha=opts.alpha)
