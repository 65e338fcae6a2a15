"""calibrate(): token batches → layer-by-layer statistics → per-Linear results for the writers.

  scheme / algorithm          statistics           propagation   result
  int8 + smoothquant          absmax               float         norms folded (overrides), int8 codes
  int8 + smoothquant+gptq     absmax, xtx          quantized     same, int8 codes by GPTQ
  w4a16(-asym) / int8-w8a16:
      gptq                    xtx                  quantized     codes/scales (GPTQ)
      awq                     abs_sum, xtx         quantized     norms folded, codes/scales (RTN)
      awq+gptq                abs_sum, xtx         quantized     norms folded, codes/scales (GPTQ)
  fp8-static                  absmax               float         input_scales = absmax/448
  GGUF --imatrix              sum_sq               float         imatrix (Σx², count) per Linear
"Quantized" propagation feeds layer i+1 the outputs of the already-quantized layers 0..i (GPTQ's
sequential mode); "float" propagation is the float model (SmoothQuant's and llama-imatrix's statistics).

Float target (`float_target=True`, gptq only; GPTAQ, Li et al. 2025, arXiv:2504.02692, in closed form):
plain GPTQ fits Ŵ to W on the quantized model's inputs X, min ||X Ŵᵀ − X Wᵀ||², so each layer inherits
the earlier layers' error. Fitting the FLOAT model's outputs instead, min ||X Ŵᵀ − F Wᵀ||² (F: the same
tokens' inputs in the float model), is the same problem for the least-squares target
    W_t = W · FᵀX · (XᵀX + λI)⁻¹        (λ = GPTQ's damping)
because ||XŴᵀ − FWᵀ||² = ||X(Ŵ − W_t)ᵀ||² + const; so W_t goes to plain GPTQ with H = XᵀX. Each layer
then partly compensates the error it receives instead of passing it on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..formats.checkpoint import Checkpoint
from ..errors import GemmaQuantError
from ..numerics.ct.quantize import FP8_MAX
from ..schemes import Scheme, get_scheme
from .awq import awq_layer
from .experts import ExpertTokens, awq_experts, expert_stats, names, quantize_experts, smooth_experts
from .experts import input_scales as expert_input_scales
from .data import calibration_batches, load_tokenizer_for
from .fold import MAPPINGS, consumer_names
from .gptq import gptq_quantize
from ..numerics.ct.grid import WeightQuant, rtn, split_rows
from .runner import Progress, run_layers
from .smoothquant import smooth_layer
from .stats import OWN_INPUT, ExpertStats


@dataclass
class CalibResult:
    # full Linear name (`model.layers.3.mlp.down_proj`) → quantized weight; when an algorithm folded
    # scales, EVERY Linear of the model is here and must be written from it
    quantized: dict[str, WeightQuant] = field(default_factory=dict)
    # HF tensor name → new tensor in the stored dtype (the norms SmoothQuant/AWQ folded scales into)
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    input_scales: dict[str, float] = field(default_factory=dict)  # Linear name → static fp8 scale
    # name → (Σx² [in] f32, count); MoE experts (`…experts.gate_up_proj`): ([E, in], [count per expert])
    imatrix: dict[str, tuple[torch.Tensor, int | list[int]]] = field(default_factory=dict)
    expert_tokens: ExpertTokens = field(default_factory=ExpertTokens)  # MoE: tokens routed to each expert
    notes: str = ""

    def packed(self, ct_format: str) -> dict:
        """`quantized` in the compressed-tensors writer's dataclasses (`write_compressed_tensors`)."""
        return {name: to_packed(q, ct_format) for name, q in self.quantized.items()}


def to_packed(q: WeightQuant, fmt: str):
    """One result in the writer's tensors of compressed-tensors format `fmt` (numerics/ct/formats.py)."""
    from ..numerics.ct.formats import ct_format

    return ct_format(fmt).from_grid(q)


def calibrate(ckpt: Checkpoint, scheme: Scheme | str, *, algorithm: str | None = None,
              calib_path: Path | None = None, n_samples: int = 128, seq_len: int = 512,
              alpha: float = 0.8, imatrix: bool = False, ids: torch.Tensor | None = None,
              tokenizer=None, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32,
              batch_size: int = 4, damp: float = 0.01, act_order: bool = True, awq_grid: int = 20,
              gptq_mse: bool = True, gptq_refit: bool = True, float_target: bool = False,
              mappings=MAPPINGS, progress: Progress | None = None, sink=None) -> CalibResult:
    """Run the calibration `scheme` (+ `algorithm`, default: the scheme's first) needs.

    alpha: SmoothQuant migration strength; 0.8 by default because it drifted least on the demo model,
    ahead of the paper's 0.5 (benchmarks/RESULTS.md, bench_calib_quality.py).
    gptq_mse / gptq_refit (clip search, least-squares scale refit; gptq.py): on by default, both lowered
    the w4a16 drift (RESULTS.md). float_target: off by default: with a few thousand calibration tokens
    the least-squares target over-fits a 2048-wide down_proj input.
    `ids` [n, S] bypasses tokenization (tests, benchmarks). GGUF schemes calibrate only with `imatrix`.
    `sink(name, WeightQuant)`, if given, receives each Linear's result as its layer finishes instead of
    `CalibResult.quantized` holding them all (a 9B model's int8 codes alone would be 9 GB).
    `progress(done, total, what)` hears of each layer (runner.py).
    """
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    cfg = ckpt.config
    algorithm = check_algorithm(scheme, algorithm, imatrix)
    notes: list[str] = []
    res = CalibResult()
    stored = {n: ckpt.dtype(n) for n in ckpt.names()}

    kinds, sequential = set(), False
    if imatrix:
        kinds |= {"sum_sq"}
    static_fp8 = scheme.input_activations is not None and not scheme.input_activations.dynamic
    if static_fp8:
        kinds |= {"absmax"}
    if algorithm == "smoothquant":
        kinds |= {"absmax"}
    elif algorithm == "smoothquant+gptq":
        kinds |= {"absmax", "xtx"}
        sequential = True
    elif algorithm in ("gptq", "awq", "awq+gptq"):
        kinds |= {"xtx"} | ({"abs_sum"} if "awq" in algorithm else set())
        sequential = True
    if float_target:
        if algorithm != "gptq":  # AWQ's folded scales would change X but not F
            raise GemmaQuantError(f"the float target applies to gptq only, not {algorithm}")
        if cfg.is_moe:  # the experts see different tokens in the float and the quantized stream
            raise GemmaQuantError(f"{ckpt.path}: the float target is not supported on a mixture of experts")
        kinds |= {"xfx"}
    if not kinds:
        return CalibResult(notes=f"{scheme.name} with {algorithm}: nothing to calibrate")

    w = scheme.weights
    if algorithm not in (None, "rtn") and (w is None or w.type != "int"):
        raise GemmaQuantError(f"algorithm {algorithm} needs an integer weight scheme, not {scheme.name}")
    gs = w.group_size if w is not None and w.strategy == "group" else None

    def on_layer(i, layer, stats):
        prefix = f"model.layers.{i}."
        local = {name[len(prefix):]: st for name, st in stats.items()}
        quantizable = cfg.linear_shapes(i)  # the router and experts are not compressed-tensors Linears here
        for name, st in stats.items():  # statistics of the float inputs (before any folding)
            if imatrix:
                if isinstance(st, ExpertStats):  # per expert: [E, in] sums and E counts, as llama-imatrix
                    width = layer.get_parameter(name[len(prefix):]).shape[-1]
                    res.imatrix[name] = (st.stacked("sum_sq", width).float(), st.counts)
                else:
                    res.imatrix[name] = (st.sum_sq.float().clone(), st.count)
            if static_fp8 and name[len(prefix):] in quantizable:
                res.input_scales[name] = st.absmax.max().item() / FP8_MAX
        moe = expert_stats(stats, prefix)
        if moe is not None:
            res.expert_tokens.counts[i] = moe[0].counts
            if static_fp8:
                res.input_scales.update(expert_input_scales(prefix, *moe))
        if static_fp8 and cfg.generation == 4 and cfg.kv_shared(i):
            # Google's E2B/E4B files keep K/V projections on KV-shared layers; they never run, and they would
            # read q_proj's input (notes/gemma4 §4.3): the writer quantizes them, so they take its scale
            for sfx in ("self_attn.k_proj", "self_attn.v_proj"):
                if prefix + sfx + ".weight" in stored:
                    res.input_scales[prefix + sfx] = res.input_scales[prefix + "self_attn.q_proj"]
        if algorithm is None or algorithm == "rtn":
            return
        norm_dtype = stored[prefix + "input_layernorm.weight"]
        if algorithm.startswith("smoothquant"):
            norms = smooth_layer(layer, local, alpha=alpha, mappings=mappings, stored_dtype=norm_dtype)
            if moe is not None:
                norms |= smooth_experts(layer, *moe, alpha=alpha, mappings=mappings, stored_dtype=norm_dtype)
        elif "awq" in algorithm:
            norms = awq_layer(layer, local, bits=w.num_bits, group_size=gs, symmetric=w.symmetric,
                              mappings=mappings, stored_dtype=norm_dtype, n_grid=awq_grid)
            if moe is not None:
                norms |= awq_experts(layer, *moe, bits=w.num_bits, group_size=gs, symmetric=w.symmetric,
                                     mappings=mappings, stored_dtype=norm_dtype, n_grid=awq_grid)
        else:
            norms = {}
        for attr, t in norms.items():
            res.overrides[prefix + attr + ".weight"] = t
        # Linears reading one input share H: quantize their rows together; Gemma 4's per-layer-input
        # Linears read their own inputs (nothing to fold them into: they are quantized, not smoothed)
        groups = [consumer_names(m, layer) for m in MAPPINGS] + [[s] for s in OWN_INPUT if s in quantizable]

        def quantize(W, st, where):
            if not algorithm.endswith("gptq"):
                return rtn(W, w.num_bits, gs, w.symmetric)
            try:
                if float_target:
                    W = float_target_weight(W, st.xtx, st.xfx, damp)
                return gptq_quantize(W, st.xtx, bits=w.num_bits, group_size=gs, symmetric=w.symmetric,
                                     damp=damp, act_order=act_order, mse=gptq_mse, refit=gptq_refit)
            except (ValueError, GemmaQuantError) as e:
                raise GemmaQuantError(f"GPTQ failed on {where}: {e}") from None

        def emit(name, part):
            if sink is None:
                res.quantized[name] = part
            else:
                sink(name, part)

        for suffixes in groups:
            lins = [layer.get_submodule(sfx) for sfx in suffixes]
            W = torch.cat([lin.weight.detach() for lin in lins])
            q = quantize(W, local[suffixes[0]], prefix + suffixes[0])
            for sfx, lin, part in zip(suffixes, lins, split_rows(q, [lin.out_features for lin in lins])):
                emit(prefix + sfx, part)
                if sequential:  # the next layers calibrate on this layer's quantized outputs
                    with torch.no_grad():
                        lin.weight.copy_(part.dequantize().to(lin.weight.dtype))
        if moe is not None:
            for name, part in quantize_experts(layer, prefix, *moe, quantize, bits=w.num_bits, group_size=gs,
                                               symmetric=w.symmetric, sequential=sequential):
                emit(name, part)

    if ids is None:
        tokenizer = tokenizer or load_tokenizer_for(ckpt.path, rows=ckpt.config.vocab_size)
        ids = calibration_batches(tokenizer, calib_path, n_samples, seq_len, seed,
                                  bos_id=ckpt.config.bos_token_id, notes=notes)
    run_layers(ckpt, ids, kinds=kinds, on_layer=on_layer, sequential=sequential, dtype=dtype,
               device=device, batch_size=batch_size, progress=progress, float_target=float_target)
    n, s = ids.shape
    if algorithm is not None and algorithm.endswith("gptq"):
        extras = [f"damp {damp}", "act-order" if act_order else "no act-order"]
        extras += ["clip search"] * gptq_mse + ["scale refit"] * gptq_refit + ["float target"] * float_target
        algorithm_text = f"{algorithm} ({', '.join(extras)})"
    else:
        algorithm_text = algorithm
    notes.append(f"calibrated {scheme.name}"
                 + (f" with {algorithm_text}" if algorithm not in (None, "rtn") else "")
                 + (" + imatrix" if imatrix else "") + f" on {n} × {s} tokens")
    if res.expert_tokens.counts and not scheme.is_gguf:
        notes.append(res.expert_tokens.summary())
        unseen = res.expert_tokens.unseen()
        if unseen:
            fallback = ["the max over the layer's other experts' input scales"] if static_fp8 else []
            if algorithm not in (None, "rtn"):
                folds = algorithm.startswith(("smoothquant", "awq"))  # the shared gate/up scale still applies
                fallback.append("round-to-nearest weights" + (" with no down_proj scale of their own" if folds else ""))
            logging.getLogger("gemmaquant").warning(
                f"{len(unseen)} MoE experts saw no calibration token ({names(unseen)}): data-free fallback, "
                f"{' and '.join(fallback)} (longer or more varied calibration text reaches more experts)")
    res.notes = "; ".join(notes)
    return res


def float_target_weight(W: torch.Tensor, xtx: torch.Tensor, xfx: torch.Tensor, damp: float) -> torch.Tensor:
    """W [out, in] → W_t = W · FᵀX · (XᵀX + λ·mean diag·I)⁻¹ (float64 solve; see the module docstring)."""
    H = xtx.double()
    H = H + damp * H.diagonal().mean().clamp(min=1e-30) * torch.eye(H.shape[0], dtype=H.dtype)
    # W_t Hᵀ = W FᵀX  ⇔  H W_tᵀ = (W FᵀX)ᵀ  (H symmetric)
    rhs = (W.double() @ xfx.double()).T
    return torch.linalg.solve(H, rhs).T.to(W.dtype)


def check_algorithm(scheme: Scheme, algorithm: str | None, imatrix: bool) -> str | None:
    if scheme.is_gguf:
        if algorithm not in (None, "rtn"):
            raise GemmaQuantError(f"GGUF scheme {scheme.name} takes no --algorithm (use --imatrix)")
        return None
    if imatrix:
        raise GemmaQuantError(f"--imatrix applies to GGUF schemes only, not {scheme.name}")
    allowed = scheme.allowed_algorithms
    if algorithm is None:
        return allowed[0] if allowed else None
    if algorithm not in allowed:
        raise GemmaQuantError(f"algorithm {algorithm!r} does not apply to {scheme.name} "
                              f"(allowed: {', '.join(allowed) or 'none'})")
    return algorithm
