"""How much each tensor at each GGML type would cost the model's output: an estimate of the KL
divergence from the float model it adds, measured on calibration text in one streaming pass.

Per decoder layer i (one layer resident, the float model's activations h):
* the hooked float pass gives each Linear's input statistics (imatrix Σx²/count, H = XᵀX);
* every candidate type T of tensor t is quantized as llama.cpp would (`ggml.quantize`, with that
  imatrix) and scored by its layer-output error e(t,T) = ||X(W − Ŵ)ᵀ||² = tr(ΔHΔᵀ), on up to
  `max_rows` evenly spaced rows (scaled to all rows: the error is a sum over rows);
* one forward of the layer with t alone at a reference type (Q4_0) turns that into the error of
  the layer's output, `||δ_layer||² ≈ g_t · e(t,T)` (g_t: how much of a Linear's output error reaches
  the residual stream, through norms, attention and the MLP's gate);
* one more forward with all of the layer's tensors at the reference type starts a perturbed copy of
  the residual stream, which the later (float) layers carry to the logits: its KL from the float
  logits over its ||δ_layer||² is the layer's gain G_i.
Then ΔKL(t, T) ≈ G_i · g_t · e(t,T). The tied token embedding gets both of its roles measured: as the
LM head, the KL of the float final states through the quantized table (per type; on a sample of
`head_rows` rows of a bigger table, Gemma 3/4's 262144, `sensitivity_parts.Head`); as the input
embedding, a perturbed stream from the start, scaled by each type's embedding error.

llama.cpp's CPU backend also rounds every quantized product's input to 8 bits, in blocks of the weight
type's `vec_dot_type`: Q8_0's 32 for the 32-weight types, Q8_K's 256 for the K- and IQ-quants. On a
GeGLU output (ffn_down's input: a few large values per token) blocks of 256 cost several times what
blocks of 32 do, as much as Q6_K's weights themselves. So e(t,T) also counts that rounding at T's block
(`InputForms.act_error`, a sum per input channel: the rounding errors of different channels do not add
up coherently), and the LM head's KL is taken through the rounded final states. The gains stay per unit
of the weights' error: the trials run float activations. (`activations=False`: the weights alone.)

For a file whose decoder Linears get error-feedback codes (`--algorithm gptq`), e(t,T) is those codes'
error instead (`feedback`): fitted on half of the windows, scored on the other half, as a ratio to
llama.cpp's rounding on the same half. The gains stay measured with llama.cpp's rounding.

Gemma 4 (calib/sensitivity_parts.py holds the pieces):
* every tensor llama-quantize quantizes is measured (`choosable`): a layer's own Linears (KV-shared
  layers have no k/v, k_eq_v full layers no v), the per-layer input gate and projection, and each fused
  expert tensor (`ffn_gate_up_exps`, `ffn_down_exps`) as ONE tensor, its error summed over experts on the
  tokens the router really sends each (the float pass's routing; each expert with its own importance);
  the router and the per-layer model projection are never quantized, rows no candidate block divides
  keep llama-quantize's fallback;
* each stream keeps its own K/V for the KV-shared layers. The k/v of a layer whose K/V later layers
  reuse get a stream of their own (the trial output, with its K/V), whose KL is their gain directly;
  the layer's all-at-reference stream keeps the float K/V, so G_i is the residual's gain alone;
* the per-layer input table (`per_layer_token_embd`) gets a stream whose per-layer inputs come from its
  used rows at the reference type, scaled by each type's row error, like the input embedding; the
  embedding's stream also feeds its perturbed embedding to the per-layer model projection.

These are second-order estimates (KL is quadratic in small perturbations, and the per-tensor costs
add): good for ranking the choices of `budget.py`, not a replacement for llama-perplexity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch

from ..formats.checkpoint import Checkpoint
from ..numerics.ggml.types import BLOCK, GGMLType
from ..formats.gguf.names import gguf_name
from ..model.loading import load_layer
from ..model.gemma import embed_scale, make_layer_context
from .ggml_calibrate import imatrix_of, optimize_layer_tensor
from .runner import PerLayerInputs, embed_ids, model_ids
from .sensitivity_parts import (ExpertInputs, Head, InputForms, Stream, Switch, bf16_rows, expert_error,
                                expert_imatrix, quantized, run_layer, sampled_rows, trim_heap)
from .stats import INPUT_OF, attach, input_groups

T = GGMLType
# Types the budget chooses from, by increasing size (bits per weight in brackets).
CANDIDATES = (T.Q2_K, T.Q3_K, T.IQ3_S, T.IQ4_XS, T.Q4_0, T.IQ4_NL, T.Q4_K, T.Q4_1, T.Q5_0, T.Q5_K, T.Q5_1,
              T.Q6_K, T.Q8_0)
# What a size budget chooses from by default: our IQ3_S search (exact emulation of llama.cpp's grid
# search) is two orders of magnitude slower than the other quantizers, too slow to try on every tensor.
BUDGET_TYPES = tuple(t for t in CANDIDATES if t != T.IQ3_S)
REFERENCE = T.Q4_0  # block of 32: every tensor with a candidate type can take it
# Quantizable shapes llama-quantize still never quantizes (Gemma 4's router; the per-layer model
# projection stays the converter's BF16)
NEVER_QUANTIZED = ("ffn_gate_inp.weight", "per_layer_model_proj.weight")


def candidates(ncols: int, allowed=CANDIDATES) -> list[GGMLType]:
    """The candidate types a row of `ncols` weights can use without llama.cpp's fallback."""
    return [t for t in allowed if ncols % BLOCK[t][0] == 0]


@dataclass
class TensorSensitivity:
    name: str  # GGUF name
    shape: tuple[int, int]
    kl: dict[GGMLType, float]  # estimated ΔKL (nats/token) per candidate type
    detail: str = ""


@dataclass
class SensitivityReport:
    tensors: dict[str, TensorSensitivity] = field(default_factory=dict)
    layer_gain: list[float] = field(default_factory=list)  # G_i
    tokens: int = 0
    kl_tokens: int = 0
    seconds: float = 0.0


def _linear_error(W: torch.Tensor, forms: InputForms, suffix: str, t: GGMLType, imatrix, max_rows: int,
                  factors: dict | None = None) -> tuple[float, float, float]:
    """At type t: (the layer-output error of llama.cpp's rounding, that of the codes the file will hold,
    what llama.cpp's CPU rounding of the input adds to the latter's).

    `factors` (a cache of the fit half's H factors, shared by the Linears reading the same input): the
    file holds error-feedback codes (`--algorithm gptq`, `ggml_calibrate.optimize_layer_tensor`). They
    are fitted on half of the windows, and their error is llama.cpp's on all tokens times the ratio of
    the two on the other half: on the tokens it was fitted on, error feedback looks much better than it
    is (RESULTS.md §11, tenth round)."""
    rows = sampled_rows(W.shape[0], max_rows)
    Ws = bf16_rows(W, rows)
    Wq = quantized(Ws, t, imatrix)
    scale = W.shape[0] / len(rows)
    D = (Ws - Wq).double()
    e = forms.error(suffix, D) * scale
    if factors is None:
        return e, e, forms.act_error(suffix, Wq, t) * scale
    _, Wf, *_ = optimize_layer_tensor(Ws, forms.hessian(suffix, "fit"), t, imatrix, factors=factors)
    held = forms.error(suffix, D, "held")
    ratio = forms.error(suffix, (Ws - Wf).double(), "held") / held if held > 0 else 1.0
    return e, e * ratio, forms.act_error(suffix, Wf, t) * scale


def choosable(name: str, shape: tuple[int, ...], allowed=CANDIDATES) -> bool:
    """Whether a budget chooses this tensor's type: what llama-quantize quantizes (not 1-D tensors or
    norms, not Gemma 4's router or per-layer model projection, which it never quantizes) and whose
    rows some candidate type's block divides (else llama-quantize's fallback decides: F16)."""
    if len(shape) < 2 or name.endswith("_norm.weight") or name.endswith(NEVER_QUANTIZED):
        return False
    return bool(candidates(shape[-1], allowed))


def measure_sensitivity(ckpt: Checkpoint, ids: torch.Tensor, *, max_rows: int = 256, kl_positions: int = 64,
                        batch_size: int = 4, embed_types=CANDIDATES, types=CANDIDATES, head_rows: int = 16384,
                        activations: bool = True, feedback: bool = False, progress=None) -> SensitivityReport:
    """Estimated ΔKL of every quantizable tensor at every candidate type (module doc).

    `activations`: a decoder Linear's cost at a type includes llama.cpp's CPU rounding of its input to
    8 bits for that type (`InputForms.act_error`), not only its weights' error.
    `feedback`: the decoder-layer Linears that `--algorithm gptq` writes with error-feedback codes
    (`stats.INPUT_OF`) are scored at those codes, not at llama.cpp's rounding (`_linear_error`). The
    token table and Gemma 4's experts and per-layer input Linears keep llama.cpp's rounding in such a
    file, and in the scores. Without it a budget for a gptq file pays the decoder's types as if
    rounded, and buys decoder bytes that error feedback would have made cheap with table bytes
    (RESULTS.md §11, tenth round: the q5_k_m-sized plan).

    ids [n, S]: calibration windows; the KL is taken on the last `kl_positions` positions of each.
    `head_rows`: a bigger LM head has its types scored on that many of its rows (`Head`).
    `progress(done, total, what)` is called per layer and after the LM head."""
    t0 = time.perf_counter()
    cfg = ckpt.config
    ids = model_ids(ckpt, ids)
    n, S = ids.shape
    rep = SensitivityReport(tokens=n * S)
    kl_pos = torch.arange(max(0, S - kl_positions), S)
    rep.kl_tokens = n * len(kl_pos)
    head = Head(ckpt, kl_pos, max_rows=head_rows, activations=activations)
    with torch.no_grad():
        h = embed_ids(ckpt, ids)
        ctx = make_layer_context(cfg, S, torch.device("cpu"), torch.float32)
        ple = PerLayerInputs(ckpt, ids, h.clone(), torch.float32, "cpu") if cfg.hidden_size_per_layer_input else None
        main = Stream(h, ple)
        # token_embd as input embedding: the used rows quantized (row-local, no imatrix: llama-imatrix
        # has no entry for it), one perturbed stream at the reference type (its per-layer inputs
        # project the perturbed embedding too)
        table = ckpt.tensor("model.embed_tokens.weight")
        used, inv = torch.unique(ids, return_inverse=True)
        rows = table[used].float()
        scale = embed_scale(cfg, torch.float32)
        emb_err, emb_delta_ref = {}, None
        for t in candidates(cfg.hidden_size, embed_types):
            d = (quantized(rows, t, None) - rows)[inv] * scale
            emb_err[t] = float((d.double() ** 2).sum())
            if t == REFERENCE:
                emb_delta_ref = d
        h_emb = h + emb_delta_ref
        streams: list[Stream] = [Stream(h_emb, PerLayerInputs(ckpt, ids, h_emb.clone(), torch.float32, "cpu")
                                        if ple is not None else None)]
        ple_err = _per_layer_table(ckpt, ids, h, streams, embed_types)  # Gemma 4 E2B/E4B: a second stream
        layer_stream: list[int] = []  # stream index of layer i's all-at-reference copy
        layer_err: list[float] = []
        # GGUF name -> (stream or None, shape, errs, tensor gain, layer, act errs, llama.cpp's error at REFERENCE)
        infos: dict[str, tuple] = {}
        for i in range(cfg.num_hidden_layers):
            err, k = _layer_pass(ckpt, i, main, streams, ctx, batch_size, types, max_rows, infos, activations,
                                 feedback)
            layer_err.append(err)
            layer_stream.append(k)
            if progress:  # the LM head counts as one more step (minutes on a 262144-row table)
                last = i + 1 == cfg.num_hidden_layers
                progress(i + 1, cfg.num_hidden_layers + 1, "LM head" if last else f"layer {i + 1}")
        # the head: every perturbed stream through the float table, and the float final states through
        # the table at each type, in one pass over the table's row chunks (`Head`)
        h = main.h
        kls, head_kl = head.kls(h, [s_.h for s_ in streams], candidates(head.W.shape[1], embed_types))
        if progress:
            progress(cfg.num_hidden_layers + 1, cfg.num_hidden_layers + 1, "LM head")
    g_emb = kls[0] / max(emb_err[REFERENCE], 1e-30)
    rep.layer_gain = [kls[k] / max(e, 1e-30) for k, e in zip(layer_stream, layer_err)]
    for name, (own, shape, errs, g, i, act, ref) in infos.items():
        # the gains are per unit of the weights' error (the trials run float activations); the input's
        # 8-bit rounding at each type then costs what the same error of the weights would
        if own is None:  # the layer's gain times the tensor's share of the layer's output error
            G = rep.layer_gain[i]
            kl = {t: G * g * (e + act.get(t, 0.0)) for t, e in errs.items()}
            why = f"layer gain {G:.3g}, tensor gain {g:.3g}"
        else:  # a K/V producer's k/v: its own stream carries the residual and the shared K/V to the logits
            unit = kls[own] / max(ref, 1e-30)
            kl = {t: unit * (e + act.get(t, 0.0)) for t, e in errs.items()}
            why = f"K/V shared with later layers: own gain {unit:.3g}"
        rep.tensors[name] = TensorSensitivity(name, shape, kl, why)
    if ple_err is not None:
        unit = kls[1] / max(ple_err[0][REFERENCE], 1e-30)
        rep.tensors["per_layer_token_embd.weight"] = TensorSensitivity(
            "per_layer_token_embd.weight", ple_err[1], {t: unit * e for t, e in ple_err[0].items()},
            f"per-layer input table: gain {unit:.3g}")
    emb = {t: g_emb * e for t, e in emb_err.items()}
    if head.tied:
        emb = {t: v + head_kl[t] for t, v in emb.items()}
        why = f"input gain {g_emb:.3g}; as the tied LM head, KL measured per type"
    else:
        rep.tensors["output.weight"] = TensorSensitivity("output.weight", tuple(head.W.shape), head_kl,
                                                         "LM head: KL measured per type")
        why = f"input gain {g_emb:.3g}"
    rep.tensors["token_embd.weight"] = TensorSensitivity("token_embd.weight", tuple(table.shape), emb, why)
    rep.seconds = time.perf_counter() - t0
    return rep


def _layer_pass(ckpt: Checkpoint, i: int, main: Stream, streams: list[Stream], ctx, batch_size: int, types,
                max_rows: int, infos: dict, activations: bool, feedback: bool) -> tuple[float, int]:
    """Decoder layer i (module doc): every stream through it, each measured tensor's errors and trial into
    `infos`, the all-at-reference stream appended; (its layer output error, its stream index). A function
    of its own so that the layer and everything holding its weights go when it returns, before the next
    layer loads."""
    gen = ckpt.config.generation
    trim_heap()  # what the previous layer's pass freed
    layer = load_layer(ckpt, i, stored=True)  # its Linears and experts in the stored dtype, cast where used
    stats, handles = attach(layer, f"model.layers.{i}.", {"sum_sq"})
    forms = InputForms(layer, main.h.shape[0] * main.h.shape[1], activations, split=feedback)
    routed = ExpertInputs(layer.experts) if hasattr(layer, "experts") else None
    try:
        out = run_layer(layer, i, main, ctx, batch_size)  # float: producers keep their K/V in main
    finally:
        for hd in handles:
            hd.remove()
        forms.remove()
        if routed is not None:
            routed.remove()
    for s_ in streams:
        s_.h = run_layer(layer, i, s_, ctx, batch_size)
    trial = partial(run_layer, layer, i, main, ctx, batch_size)
    at_ref: list[Switch] = []  # every measured tensor, switchable to the reference type
    factors: dict[str, dict] = {}  # input -> H factors of its fit half (q/k/v and gate/up share one)
    groups = input_groups(layer)
    for sfx in groups:  # every decoder-layer Linear, in order
        hf = f"model.layers.{i}.{sfx}"
        name = gguf_name(hf + ".weight", gen)
        lin = layer.get_submodule(sfx)
        if not choosable(name, tuple(lin.weight.shape), types):
            continue
        st = stats[hf]
        W = lin.weight.detach()
        imat = imatrix_of(st.sum_sq, st.count)
        fb = factors.setdefault(groups[sfx], {}) if feedback and sfx in INPUT_OF else None
        both = {t: _linear_error(W, forms, sfx, t, imat, max_rows, fb) for t in candidates(W.shape[1], types)}
        errs = {t: e for t, (_, e, _) in both.items()}
        ref = both[REFERENCE][0]  # the trial below runs llama.cpp's rounding
        at_ref.append(Switch(layer, sfx, REFERENCE, imat))
        trim_heap()
        own = _trial_gain(main, at_ref[-1], ref, trial, out, streams,
                          sfx.endswith(("k_proj", "v_proj")) and layer.self_attn.stores_kv)
        infos[name] = (*own[:1], tuple(W.shape), errs, own[1], i, {t: a for t, (_, _, a) in both.items()}, ref)
    if routed is not None:
        for which, param in (("gate_up", layer.experts.gate_up_proj), ("down", layer.experts.down_proj)):
            name = gguf_name(f"model.layers.{i}.experts.{which}_proj", gen)
            W = param.detach()
            if not choosable(name, tuple(W.shape), types):
                continue
            X = routed.of(which)
            imat = expert_imatrix(X)
            both = {t: expert_error(W, X, imat, t, max(8, max_rows // 8), activations)
                    for t in candidates(W.shape[-1], types)}
            errs = {t: e for t, (e, _) in both.items()}
            trim_heap()
            at_ref.append(Switch(layer, f"experts.{which}_proj", REFERENCE, imat, [x is not None for x in X]))
            trim_heap()
            own = _trial_gain(main, at_ref[-1], errs[REFERENCE], trial, out, streams, False)
            infos[name] = (*own[:1], tuple(W.shape), errs, own[1], i, {t: a for t, (_, a) in both.items()},
                           errs[REFERENCE])
    for sw in at_ref:
        sw.reference()
    kv = main.kv_copy()
    pert = run_layer(layer, i, main, ctx, batch_size, kv=kv)
    for sw in at_ref:  # the experts' stand-ins refer back to them: the layer must go with this call
        sw.restore()
    for b, d in kv.items():  # the residual alone: a producer's own K/V effect has its tensors' streams
        if i in d:
            d[i] = main.kv[b][i]
    streams.append(Stream(pert, main.ple, kv))
    main.h = out
    return float(((pert - out).double() ** 2).sum()), len(streams) - 1


def _trial_gain(main: Stream, switch: Switch, ref: float, trial, out, streams: list[Stream], producer: bool):
    """One tensor at the reference type (llama.cpp's rounding, whose own error is `ref`) for one forward
    of its layer: (None, g_t), g_t its layer output error per unit of its own error; for a K/V
    producer's k/v (whose K/V later layers read) the trial output becomes a stream of its own, carrying
    its K/V: (stream index, None)."""
    switch.reference()
    try:
        kv = main.kv_copy()
        y = trial(kv=kv)
    finally:
        switch.restore()  # the value as loaded (an f32 source's float pass ran with it, not its bf16 rounding)
    if producer:
        streams.append(Stream(y, main.ple, kv))
        return len(streams) - 1, None
    return None, float(((y - out).double() ** 2).sum()) / max(ref, 1e-30)


def _per_layer_table(ckpt: Checkpoint, ids: torch.Tensor, h: torch.Tensor, streams: list[Stream], types):
    """Gemma 4's per-layer input table (`per_layer_token_embd`, rows of L·P): its used rows' error per
    type and one stream (appended) whose per-layer inputs come from the rows at the reference type;
    None when the model has none or no candidate type fits its rows (llama-quantize's fallback then)."""
    cfg = ckpt.config
    if not cfg.hidden_size_per_layer_input:
        return None
    table = ckpt.tensor("model.embed_tokens_per_layer.weight")
    if not choosable("per_layer_token_embd.weight", tuple(table.shape), types):
        return None
    used, inv = torch.unique(ids, return_inverse=True)
    rows = table[used].to(torch.bfloat16).float()
    err, ref = {}, None
    for t in candidates(table.shape[1], types):
        q = quantized(rows, t, None)
        err[t] = float(((q - rows)[inv].double() ** 2).sum())
        if t == REFERENCE:
            ref = q
    pl = PerLayerInputs(ckpt, ids, h.clone(), torch.float32, "cpu")
    pl.table, pl.ids = ref, inv  # the used rows only, at the reference type
    streams.append(Stream(h.clone(), pl))
    return err, tuple(table.shape)
