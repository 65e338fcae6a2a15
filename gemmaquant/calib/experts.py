"""Calibrated compressed-tensors schemes on Gemma 4's MoE experts, from the tokens the model routes.

Each expert's Linears are calibrated on the tokens the router's top-k sends to that expert in the
ordinary forward pass (`Experts.observer`): gate/up see the routed tokens' normalized inputs (the
routing weight is applied to the expert's OUTPUT, so it is not in its inputs), down sees the expert's
own GeGLU product. (llm-compressor's MoE calibration modules can instead push every token through every
expert for the statistics, `calibrate_all_experts`; here the statistics are those of the distribution
the expert really serves, and an expert no calibration token reaches is named and falls back.)

  scheme                 per expert e with tokens                 e saw no token (fallback, warned)
  fp8-static             input_scale = absmax(routed x)/448       the max over the layer's experts that
                                                                  saw tokens (what vLLM runs anyway: its
                                                                  fused MoE takes the max over experts)
  w4a16 / w8a16 gptq     GPTQ with H_e = Σ routed xᵀx             round-to-nearest (min-max scales)
  awq                    see below, then RTN / GPTQ               RTN of the (folded) weights
  int8 smoothquant       see below, then RTN / GPTQ               RTN of the (folded) weights

Folding scales (SmoothQuant, AWQ). The experts read `pre_feedforward_layernorm_2`'s output (their own
norm: the dense MLP reads `pre_feedforward_layernorm`, the router the raw residual), so ONE per-channel
scale folds into it exactly and is shared by all experts' gate/up columns: like q/k/v sharing
input_layernorm, it is computed from the input's statistics over all tokens (every token reaches k
experts) and the consumers' weights over all experts (SmoothQuant: max |W| over every expert's columns;
AWQ: the grid candidate with the least summed output error Σ_e tr(ΔW_e X_eᵀX_e ΔW_eᵀ)). The down input
is each expert's own product, linear in its up rows, so each expert gets its own down scale folded into
its up rows (none for an expert without tokens: nothing to base it on).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from ..model.gemma import DecoderLayer
from ..numerics.ct.grid import rtn, split_rows
from ..numerics.ct.quantize import FP8_MAX
from .awq import grid_search, normalized_weight_mean, output_error
from .fold import fold_into_norm
from .smoothquant import smooth_scales
from .stats import ExpertStats, InputStats

NORM = "pre_feedforward_layernorm_2"
GATE_UP, DOWN = "experts.gate_up_proj", "experts.down_proj"


@dataclass
class ExpertTokens:
    """Tokens routed to each expert, per layer, in one calibration run."""

    counts: dict[int, list[int]] = field(default_factory=dict)  # layer → [tokens of expert e]

    def unseen(self) -> list[tuple[int, int]]:
        return [(i, e) for i, c in sorted(self.counts.items()) for e, n in enumerate(c) if n == 0]

    def summary(self) -> str:
        """One line: experts that saw tokens, min / median / max count, the ones that saw none."""
        flat = [n for c in self.counts.values() for n in c]
        if not flat:
            return "MoE experts: no layer calibrated"
        seen = sum(n > 0 for n in flat)
        line = (f"MoE experts: {seen} of {len(flat)} saw calibration tokens (per expert and layer: min {min(flat)}, "
                f"median {statistics.median(flat):g}, max {max(flat)})")
        unseen = self.unseen()
        return line + (f"; none reached {names(unseen)}" if unseen else "")

    def table(self) -> str:
        """Every count, one layer after another: `layer 0: 12 0 7 … | layer 1: …`."""
        return " | ".join(f"layer {i}: " + " ".join(map(str, c)) for i, c in sorted(self.counts.items()))


def names(pairs: list[tuple[int, int]], limit: int = 8) -> str:
    text = ", ".join(f"layer {i} expert {e}" for i, e in pairs[:limit])
    return text + (f" and {len(pairs) - limit} more" if len(pairs) > limit else "")


def input_scales(prefix: str, gate_up: ExpertStats, down: ExpertStats) -> dict[str, float]:
    """{`…experts.{e}.{gate,up,down}_proj`: static fp8 input scale}; gate and up of an expert read the same
    input, so their scales are equal (vLLM's fused-MoE loader refuses them otherwise)."""
    out = {}
    for st, projs in ((gate_up, ("gate_proj", "up_proj")), (down, ("down_proj",))):
        own = [None if s is None else s.absmax.max().item() / FP8_MAX for s in st.per_expert]
        fallback = max((v for v in own if v is not None), default=None)
        if fallback is None:
            raise ValueError(f"{prefix}experts: no calibration token reached any expert")
        for e, v in enumerate(own):
            for p in projs:
                out[f"{prefix}experts.{e}.{p}"] = fallback if v is None else v
    return out


def _rescale(st: InputStats | None, s: torch.Tensor) -> None:
    """The consumer now reads x / s: XᵀX → diag(1/s) XᵀX diag(1/s), Σ|x| → Σ|x| / s."""
    if st is None:
        return
    if st.xtx is not None:
        st.xtx = st.xtx / (s[:, None] * s[None, :])
    if st.abs_sum is not None:
        st.abs_sum = st.abs_sum / s.double()


def _fold_gate_up(layer: DecoderLayer, gate_up: ExpertStats, s: torch.Tensor, stored_dtype) -> torch.Tensor:
    new_w, s_eff = fold_into_norm(getattr(layer, NORM), s, stored_dtype)
    with torch.no_grad():
        layer.experts.gate_up_proj.mul_(s_eff.to(layer.experts.gate_up_proj.dtype)[None, None, :])
    for st in gate_up.per_expert:
        _rescale(st, s_eff)
    return new_w


def _fold_down(layer: DecoderLayer, e: int, down: ExpertStats, s: torch.Tensor) -> None:
    ex, i = layer.experts, layer.experts.down_proj.shape[-1]
    s = s.float()
    with torch.no_grad():
        ex.gate_up_proj[e, i:].div_(s[:, None].to(ex.gate_up_proj.dtype))  # up rows: the product is linear in them
        ex.down_proj[e].mul_(s[None, :].to(ex.down_proj.dtype))
    _rescale(down.per_expert[e], s)


def _max_absmax(st: ExpertStats) -> torch.Tensor:
    return torch.stack([s.absmax for s in st.per_expert if s is not None]).amax(0)


def smooth_experts(layer: DecoderLayer, gate_up: ExpertStats, down: ExpertStats, *, alpha: float,
                   mappings, stored_dtype) -> dict[str, torch.Tensor]:
    """SmoothQuant on the experts in place (module docstring); {norm attribute: new stored weight}."""
    norms = {}
    ex = layer.experts
    if "gate_up" in mappings:
        w = ex.gate_up_proj.detach().abs().amax((0, 1))
        norms[NORM] = _fold_gate_up(layer, gate_up, smooth_scales(_max_absmax(gate_up), w, alpha), stored_dtype)
    if "down" in mappings:
        for e, st in enumerate(down.per_expert):
            if st is not None:
                _fold_down(layer, e, down, smooth_scales(st.absmax, ex.down_proj[e].detach().abs().amax(0), alpha))
    return norms


def awq_experts(layer: DecoderLayer, gate_up: ExpertStats, down: ExpertStats, *, bits: int,
                group_size: int | None, symmetric: bool, mappings, stored_dtype,
                n_grid: int = 20) -> dict[str, torch.Tensor]:
    """AWQ's scale search on the experts in place (module docstring); {norm attribute: new stored weight}."""
    norms = {}
    ex = layer.experts
    seen = [e for e, st in enumerate(gate_up.per_expert) if st is not None]
    if "gate_up" in mappings:
        total = sum(gate_up.per_expert[e].count for e in seen)
        Ws = {e: ex.gate_up_proj[e].detach().float() for e in seen}

        def error(s):  # tokens weight the experts: each expert's error over the tokens it serves
            return sum(output_error(Ws[e], gate_up.per_expert[e].xtx / total, s, bits, group_size, symmetric)
                       for e in seen)

        x_mean = (sum(gate_up.per_expert[e].abs_sum for e in seen) / total).float()
        w_mean = normalized_weight_mean(ex.gate_up_proj.detach().float().reshape(-1, ex.gate_up_proj.shape[-1]),
                                        group_size)
        s, _, _ = grid_search(error, x_mean, w_mean, n_grid)
        norms[NORM] = _fold_gate_up(layer, gate_up, s, stored_dtype)
    if "down" in mappings:
        for e in (e for e, st in enumerate(down.per_expert) if st is not None):
            st, W = down.per_expert[e], ex.down_proj[e].detach().float()
            H = st.xtx / st.count
            s, _, _ = grid_search(lambda s: output_error(W, H, s, bits, group_size, symmetric), st.mean_abs,
                                  normalized_weight_mean(W, group_size), n_grid)
            _fold_down(layer, e, down, s)
    return norms


def quantize_experts(layer: DecoderLayer, prefix: str, gate_up: ExpertStats, down: ExpertStats, quantize, *,
                     bits: int, group_size: int | None, symmetric: bool, sequential: bool):
    """Yield (`…experts.{e}.{gate,up,down}_proj`, WeightQuant) for every expert from its current (possibly
    folded) weights: `quantize(W, stats, name)` for an expert with tokens, round-to-nearest for one without.
    `sequential`: the layer's experts take the dequantized weights (the next layers calibrate on them)."""
    ex = layer.experts
    i = ex.down_proj.shape[-1]
    for e in range(ex.num_experts):
        for st, W, parts in ((gate_up.per_expert[e], ex.gate_up_proj[e], ("gate_proj", "up_proj")),
                             (down.per_expert[e], ex.down_proj[e], ("down_proj",))):
            name = f"{prefix}experts.{e}.{parts[0]}"
            q = quantize(W.detach(), st, name) if st is not None else rtn(W.detach(), bits, group_size, symmetric)
            if sequential:
                with torch.no_grad():
                    W.copy_(q.dequantize().to(W.dtype))
            for p, part in zip(parts, split_rows(q, [i] * len(parts)) if len(parts) > 1 else [q]):
                yield f"{prefix}experts.{e}.{p}", part


def expert_stats(stats: dict, prefix: str) -> tuple[ExpertStats, ExpertStats] | None:
    gu, dn = stats.get(prefix + GATE_UP), stats.get(prefix + DOWN)
    return None if gu is None else (gu, dn)


def unseen_in(gate_up: ExpertStats) -> list[int]:
    return [e for e, n in enumerate(gate_up.counts) if n == 0]

