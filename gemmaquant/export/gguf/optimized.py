"""GGUF files tuned on calibration text (issue 21): `--algorithm gptq` and `--target-bpw/--target-size`.

    calibration windows ──► [--target-*] sensitivity pass (calib/sensitivity.py) ──► per-tensor types
                                         (calib/budget.py: least estimated ΔKL whose bytes fit)
                       ──► template: our writer's file for those types (llama.cpp's bytes)
                       ──► [gptq] streaming pass (calib/ggml_calibrate.py): each decoder-layer Linear's
                                  codes chosen with error feedback inside llama.cpp's blocks and
                                  written over the template's bytes (export/gguf/patch.py) ──► FILE.gguf

Same tensor types, shapes and offsets as the file llama-quantize would write for that type mix, so
llama.cpp loads it unchanged. Deterministic: the calibration windows are drawn with a fixed seed and
every step is bit-exact whatever the thread count.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ...formats.checkpoint import Checkpoint
from ...errors import GemmaQuantError
from ...schemes import UNQUANTIZED, Scheme

SENSITIVITY_SAMPLES = 8  # windows the sensitivity pass uses (it holds one residual stream per layer)
KEY_ALGORITHM = "gemmaquant.quantize.algorithm"
KEY_CALIBRATION = "gemmaquant.quantize.calibration"
KEY_TARGET = "gemmaquant.budget.target"
KEY_PLAN = "gemmaquant.budget.plan"
MAX_STR = 127  # longest value of our string keys (as llama-quantize caps its imatrix strings)


PRESET = "preset"  # --target-size preset: the size of the scheme's own file


@dataclass
class Budget:
    """--target-bpw X or --target-size S (exactly one). `preset`: the size is the scheme's own file's,
    known once the model is (`resolve_budget`)."""

    bpw: float | None = None
    size: int | None = None
    text: str = ""
    preset: bool = False

    def describe(self) -> str:
        return self.text


def make_budget(target_bpw: float | None, target_size: str | None) -> Budget | None:
    from ...calib.budget import parse_size

    if target_bpw is not None and target_size is not None:
        raise GemmaQuantError("--target-bpw and --target-size exclude each other (give one)")
    if target_bpw is not None:
        if isinstance(target_bpw, bool) or not 0 < float(target_bpw) < 64:
            raise GemmaQuantError(f"--target-bpw {target_bpw}: must be a number of bits per weight in (0, 64)")
        return Budget(bpw=float(target_bpw), text=f"--target-bpw {target_bpw:g}")
    if target_size is not None:
        if str(target_size).strip().lower() == PRESET:
            return Budget(preset=True, text=f"--target-size {PRESET}")
        size = parse_size(str(target_size))
        return Budget(size=size, text=f"--target-size {target_size} ({size:,} bytes)")
    return None


def check_request(scheme: Scheme, algorithm: str | None, budget: Budget | None, has_imatrix_file: bool) -> None:
    """One-line errors for combinations this module cannot make, before any work."""
    from ...calib.ggml_calibrate import supports
    from ...numerics.ggml.types import GGMLType

    if not scheme.is_gguf:
        if budget is not None:
            raise GemmaQuantError(f"{budget.text.split()[0]} applies to GGUF schemes only, not {scheme.name}")
        return
    unquantized = scheme.default_type in UNQUANTIZED
    if unquantized and (algorithm == "gptq" or budget is not None):
        what = "--algorithm gptq" if algorithm == "gptq" else budget.text.split()[0]
        raise GemmaQuantError(f"{what} needs a quantized GGUF scheme; {scheme.name} is not quantized")
    allowed = scheme.allowed_algorithms  # the registry's (schemes.py)
    if algorithm not in (None, *allowed):
        raise GemmaQuantError(f"--algorithm {algorithm!r} does not apply to GGUF scheme {scheme.name} "
                              f"(allowed: {', '.join(allowed) or 'none, it converts only'})")
    if algorithm == "gptq":
        t = GGMLType[scheme.default_type]
        if not supports(t):
            raise GemmaQuantError(f"--algorithm gptq: scheme {scheme.name}'s type {t.name} has no error-feedback "
                                  f"rounding (supported: {', '.join(supported_type_names())})")
        if has_imatrix_file:
            raise GemmaQuantError("--algorithm gptq computes its own importance from the calibration pass; "
                                  "drop --imatrix-file")


def supported_type_names() -> list[str]:
    from ...calib.ggml_codes import SCALAR_TYPES
    from ...calib.ggml_gptq_grid import GRID_TYPES

    return [t.name for t in (*SCALAR_TYPES, *GRID_TYPES)]


def cap(text: str) -> str:
    """At most MAX_STR bytes of UTF-8 (a cut inside a character drops it)."""
    return text.encode("utf-8")[:MAX_STR].decode("utf-8", errors="ignore")


def calibration_ids(ckpt: Checkpoint, opts):
    """The calibration windows [calib_samples, calib_len] (seed 0: the same every run)."""
    from ...calib.data import calibration_batches, load_tokenizer_for

    tok = load_tokenizer_for(ckpt.path, rows=ckpt.config.vocab_size)
    return calibration_batches(tok, opts.calib, opts.calib_samples, opts.calib_len,
                               bos_id=ckpt.config.bos_token_id)


def preset_plans(ckpt: Checkpoint, scheme: Scheme, has_imatrix: bool):
    from .plan import plan_types

    return plan_types(ckpt.config, scheme, has_imatrix, has_lm_head="lm_head.weight" in ckpt.names())


def header_size(ckpt: Checkpoint, scheme: Scheme, plans, imatrix_meta, extra_kv) -> int:
    from .header import header_bytes

    return len(header_bytes(ckpt.path, ckpt.config, scheme, plans, imatrix_meta, extra_kv)[0])


def preset_file_bytes(ckpt: Checkpoint, scheme: Scheme) -> int:
    """The size of the file `--scheme` alone writes, which is llama.cpp's byte for byte (without an
    imatrix's keys: the smaller of llama-quantize's files with and without `--imatrix`)."""
    from ...calib.budget import padded, tensor_bytes

    base = preset_plans(ckpt, scheme, True)
    return header_size(ckpt, scheme, base, None, None) + sum(padded(tensor_bytes(p.shape, p.type)) for p in base)


def resolve_budget(ckpt: Checkpoint, scheme: Scheme, budget: Budget | None) -> Budget | None:
    """`--target-size preset` made a size in bytes: the same file size as llama.cpp's of that preset, with
    the types chosen by measured sensitivity instead of the preset's rules."""
    if budget is None or not budget.preset:
        return budget
    size = preset_file_bytes(ckpt, scheme)
    return Budget(size=size, text=f"--target-size {PRESET} ({size:,} bytes, the {scheme.name} file's)")


@dataclass
class BudgetPlan:
    plans: list  # TensorPlan per tensor, llama.cpp's order, types chosen
    data_bytes: int  # Σ padded tensor data
    file_bytes: int | None  # exact file size (--target-size), None for --target-bpw
    limit: int  # what data_bytes (bpw) or file_bytes (size) had to stay within
    estimated_kl: float
    sensitivity_seconds: float
    kl: dict  # GGUF name -> estimated ΔKL at the chosen type

    def plan_strings(self) -> list[str]:
        return [f"{p.name}={p.type.name}" for p in self.plans if p.name in self.kl]


def solve_budget(ckpt: Checkpoint, scheme: Scheme, budget: Budget, ids, *, imatrix_meta=None,
                 extra_kv=None, feedback: bool = False, progress=None) -> BudgetPlan:
    """Per-tensor types from measured sensitivity so that the file (or its tensor data, for bpw) fits.
    `feedback`: the decoder Linears will hold error-feedback codes (--algorithm gptq), scored as such."""
    from ...calib.budget import Option, padded, solve, tensor_bytes
    from ...calib.sensitivity import BUDGET_TYPES, candidates, choosable, measure_sensitivity
    from ...numerics.ggml.types import GGMLType

    base = preset_plans(ckpt, scheme, True)
    chosen = [p for p in base if choosable(p.name, p.shape, BUDGET_TYPES)]  # what sensitivity measures
    names = {p.name for p in chosen}
    fixed = sum(padded(tensor_bytes(p.shape, p.type)) for p in base if p.name not in names)
    smallest = fixed + sum(min(tensor_bytes(p.shape, t) for t in candidates(p.n_per_row, BUDGET_TYPES)) for p in chosen)
    n_weights = sum(p.numel for p in base)
    # The header's size bound: every string key at its longest (the plan's type names, the imatrix and
    # calibration descriptions, capped at MAX_STR), so the plan depends on the budget alone and
    # --dry-run shows exactly the plan the run writes.
    longest = max(len(t.name) for t in GGMLType)
    bound_kv = {KEY_ALGORITHM: "X" * MAX_STR, KEY_CALIBRATION: "X" * MAX_STR, KEY_TARGET: "X" * MAX_STR,
                KEY_PLAN: [f"{p.name}={'X' * longest}" for p in chosen]}
    bound_meta = {"file": "X" * MAX_STR, "dataset": "X" * MAX_STR, "entries_count": 1, "chunks_count": 1}
    head = header_size(ckpt, scheme, base, bound_meta, bound_kv) if budget.size is not None else 0
    if budget.bpw is not None:  # checked before the sensitivity pass: a budget that cannot fit fails now
        limit = int(budget.bpw * n_weights / 8)
        if limit < smallest:
            raise GemmaQuantError(f"{budget.text}: below the smallest size these tensors allow "
                                  f"({8 * smallest / n_weights:.3f} bits per weight, every tensor at its smallest type)")
        room = limit - fixed
    else:
        limit = budget.size
        if limit < smallest + head:
            raise GemmaQuantError(f"{budget.text}: below the smallest file these tensors allow ({smallest + head:,} "
                                  "bytes, every tensor at its smallest type)")
        room = limit - head - fixed
    sens = measure_sensitivity(ckpt, ids[:SENSITIVITY_SAMPLES], embed_types=BUDGET_TYPES, types=BUDGET_TYPES,
                               feedback=feedback, progress=progress)
    if set(sens.tensors) != {p.name for p in chosen}:
        raise GemmaQuantError("the sensitivity pass measured other tensors than the plan has (internal error)")
    options = {n: [Option(t, tensor_bytes(s.shape, t), kl) for t, kl in s.kl.items()] for n, s in sens.tensors.items()}
    choice = solve(options, room)
    plans = []
    for p in base:
        c = choice.get(p.name)
        plans.append(p if c is None else replace(p, type=c.qtype, reason=_reason(c), fallback=False))
    data = sum(padded(tensor_bytes(p.shape, p.type)) for p in plans)
    bp = BudgetPlan(plans, data, None, limit, sum(c.damage for c in choice.values()), sens.seconds,
                    {n: c.damage for n, c in choice.items()})
    if budget.size is not None:
        kv = {**(extra_kv or {}), KEY_TARGET: cap(budget.text), KEY_PLAN: bp.plan_strings()}
        bp.file_bytes = header_size(ckpt, scheme, plans, imatrix_meta, kv) + data
        if bp.file_bytes > limit:  # cannot happen: the header was bounded above
            raise GemmaQuantError(f"{budget.text}: the plan came out at {bp.file_bytes:,} bytes (internal error)")
    return bp


def dry_run_rows(ckpt: Checkpoint, scheme: Scheme, opts) -> list[dict] | None:
    """The --dry-run plan of a --target-* run (it takes the sensitivity pass); None without a budget."""
    from ...limits import check_for_model
    from ...calib.data import calib_text

    budget = make_budget(opts.target_bpw, opts.target_size)
    check_request(scheme, opts.algorithm, budget, bool(opts.imatrix_file))
    if budget is None or not scheme.is_gguf:
        return None
    check_for_model(ckpt.config, str(ckpt.path), calib_samples=opts.calib_samples, calib_len=opts.calib_len)
    calib_text(opts.calib)
    return budget_rows(solve_budget(ckpt, scheme, resolve_budget(ckpt, scheme, budget), calibration_ids(ckpt, opts),
                                    feedback=opts.algorithm == "gptq"))


def _reason(c) -> str:
    """The solver's why, short: "budget: est. ΔKL 0.0012; 0.0025 less than IQ3_S for 3328 more bytes"."""
    rest = c.why.split(", ", 1)[1] if ", " in c.why else c.why
    return f"budget: est. ΔKL {c.damage:.2g}; {rest}"


def budget_rows(bp: BudgetPlan) -> list[dict]:
    """--dry-run rows (as pipeline.gguf_plan's)."""
    from ...calib.budget import tensor_bytes

    return [{"tensor": p.name, "shape": list(p.shape), "type": p.type.name, "bytes": tensor_bytes(p.shape, p.type),
             "note": p.reason} for p in bp.plans]


@dataclass
class TunedResult:
    report: object  # gguf.writer.Report of the template
    file_bytes: int
    notes: list
    types: dict


def write_tuned(ckpt: Checkpoint, scheme: Scheme, out: Path, opts, budget: Budget | None, text, *,
                inputs=(), progress=None, calib_progress=None) -> TunedResult:
    """The whole --algorithm gptq / --target-* run (module doc). `progress(done, total, tensor)` hears of
    the bytes written, `calib_progress(done, total, what)` of the calibration passes' layers."""
    from .writer import write_gguf

    gptq = opts.algorithm == "gptq"
    t0 = time.perf_counter()
    budget = resolve_budget(ckpt, scheme, budget)
    ids = calibration_ids(ckpt, opts)
    calib_desc = f"{ids.shape[0]} windows × {ids.shape[1]} tokens of {text.describe()}"
    imatrix_meta = {"dataset": cap(text.describe()), "entries_count": 7 * ckpt.config.num_hidden_layers,
                    "chunks_count": int(ids.shape[0])} if gptq else None
    kv = {KEY_ALGORITHM: "gptq: error-feedback rounding inside llama.cpp's blocks" if gptq else
          "rtn: llama.cpp's rounding", KEY_CALIBRATION: cap(calib_desc)}
    notes = []
    plans = None
    im_args = {} if gptq else _imatrix_args(ckpt, opts, text, notes, calib_progress)
    if not gptq:
        imatrix_meta = im_args.get("imatrix_meta")
        if "imatrix" in im_args and imatrix_meta is None:
            imatrix_meta = {"entries_count": len(im_args["imatrix"])}  # as write_gguf fills it in
    if budget is not None:
        bp = solve_budget(ckpt, scheme, budget, ids, imatrix_meta=imatrix_meta, extra_kv=kv, feedback=gptq,
                          progress=calib_progress)
        kv[KEY_TARGET] = cap(budget.text)
        kv[KEY_PLAN] = bp.plan_strings()
        plans = bp.plans
        notes.append(f"size budget {budget.text}: {len(bp.kl)} tensors' types chosen by measured sensitivity "
                     f"({min(len(ids), SENSITIVITY_SAMPLES)} calibration windows"
                     f"{', decoder Linears scored at their error-feedback codes' if gptq else ''}, "
                     f"{bp.sensitivity_seconds:.0f} s), "
                     f"estimated ΔKL {bp.estimated_kl:.4g} nats/token; plan (also in GGUF key {KEY_PLAN}): "
                     + ", ".join(s.removesuffix(".weight").replace("=", " ") for s in bp.plan_strings()))
    if not gptq:
        # llama.cpp's rounding of the chosen types (with the imatrix the user asked for, if any)
        rep = write_gguf(ckpt, scheme, out, force=opts.force, progress=progress, inputs=inputs, plans=plans,
                         extra_kv=kv, **im_args)
        return TunedResult(rep, rep.file_bytes, notes, rep.type_counts)
    from ...calib.ggml_calibrate import optimize_gguf_tensors
    from .patch import GGUFPatcher

    if plans is None:
        plans = preset_plans(ckpt, scheme, True)
    work = Path(tempfile.mkdtemp(prefix=".gemmaquant-", dir=out.parent if out.parent.exists() else None))
    try:
        template = work / "template.gguf"
        # the template: every tensor at its type with llama.cpp's rounding; its decoder-layer tensors
        # are overwritten below (an empty imatrix selects the preset's with-imatrix rules)
        rep = write_gguf(ckpt, scheme, template, imatrix={}, imatrix_meta=imatrix_meta, plans=plans,
                         extra_kv=kv, progress=progress, inputs=inputs)
        types = {p.name: p.type for p in plans if p.name.startswith("blk.") and len(p.shape) == 2}
        few = few_tokens_note(int(ids.numel()), [p for p in plans if p.name in types])
        if few:
            notes.append(few)
        # the template is ours and lies beside the output: moved into place, not copied (one file's disk)
        with GGUFPatcher(template, out, force=opts.force, inputs=[ckpt.path, *inputs], consume=True) as patch:
            res = optimize_gguf_tensors(ckpt, types, ids, sink=patch.write, progress=calib_progress, park=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    notes.append(f"--algorithm gptq: {res.summary()}; not llama-quantize's bytes (same types, sizes and offsets)")
    notes.append(f"calibration: {calib_desc}; {time.perf_counter() - t0:.0f} s in all")
    return TunedResult(rep, out.stat().st_size, notes, rep.type_counts)


def few_tokens_note(tokens: int, plans) -> str | None:
    """A warning when the calibration saw fewer tokens than the widest Linear has input columns: its
    XᵀX then has rank < columns, the error feedback fits the calibration text itself and can round
    worse than llama.cpp on other text (RESULTS.md §11, third round: 1,024 tokens on the demo's
    2048-wide down_proj lost to llama.cpp's bytes on held-out text, 10,752 won)."""
    if not plans:
        return None
    widest = max(plans, key=lambda p: (p.n_per_row, p.name))
    if tokens >= widest.n_per_row:
        return None
    return (f"warning: --algorithm gptq calibrated on {tokens} tokens, fewer than the {widest.n_per_row} input "
            f"columns of {widest.name}: the error feedback can fit the calibration text and round worse than "
            f"llama.cpp on other text; give it at least {widest.n_per_row} tokens (--calib-samples × --calib-len)")


def _imatrix_args(ckpt, opts, text, notes, progress=None) -> dict:
    if opts.imatrix_file:
        from ...formats.gguf.imatrix import read_imatrix

        im = read_imatrix(opts.imatrix_file)
        notes.append(f"imatrix from {opts.imatrix_file} ({len(im.importance)} entries)")
        return {"imatrix": im.importance, "imatrix_meta": im.meta()}
    if opts.imatrix:
        from ...calib.imatrix import compute_imatrix

        computed = compute_imatrix(ckpt, calib=opts.calib, n_samples=opts.calib_samples,
                                   seq_len=opts.calib_len, device=opts.device, progress=progress)
        im = computed.to_imatrix()
        notes.append(f"imatrix computed by gemmaquant's forward pass on {computed.describe()}; text {text.describe()}")
        return {"imatrix": im.importance, "imatrix_meta": im.meta()}
    return {}
