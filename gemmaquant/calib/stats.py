"""Running statistics of Linear inputs, collected by forward pre-hooks on one decoder layer.

For an input x [tokens, in] a Linear's statistics are per input channel j:
  * absmax_j  = max |x_tj|                 (SmoothQuant, fp8-static input scale = max_j absmax_j / 448)
  * abs_sum_j = Σ_t |x_tj|                 (AWQ's activation salience, mean |x| = abs_sum / count)
  * sum_sq_j  = Σ_t x_tj²                  (llama.cpp's imatrix `in_sum2`, with `counts` = count)
  * xtx       = Σ_t x_tᵀ x_t  [in, in]     (GPTQ's Hessian H = 2·xtx/count up to a scale GPTQ ignores)
  * xfx       = Σ_t f_tᵀ x_t  [in, in]     (f_t: the same token's input in the FLOAT model, x_t in the
                                            partly quantized one; GPTQ's float target, see pipeline.py)
Vectors accumulate in float64; xtx accumulates in float32 (a [14336, 14336] float64 Hessian of a
Gemma 2 9B down_proj would be 1.6 GB; per-mini-batch float32 products summed into a float32 total
lose ~1e-6 relative, far below GPTQ's 1% damping).

Linears that read the same tensor share one stats object: q/k/v read the attention input, gate/up
read the MLP input. Only the first of each group is hooked, so XᵀX is computed once per input.

Gemma 4 layers hook only the Linears they have (KV-shared layers have no k/v_proj: they never run,
and llama-imatrix records nothing for them; k_eq_v full layers have no v_proj), plus the per-layer-
input Linears, the MoE router (llama-imatrix records its input, `ffn_gate_inp`) and the experts:
`ExpertStats` keeps one InputStats per expert, fed with the tokens routed to it (the fused gate/up
input and the down input before the routing weight, as llama-imatrix's MUL_MAT_ID hook sees them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .threads import add_gram

KINDS = ("absmax", "abs_sum", "sum_sq", "xtx", "xfx")

# HF suffix of every decoder-layer Linear → the hooked Linear whose input it shares.
INPUT_OF = {
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj",
    "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.gate_proj",
    "mlp.down_proj": "mlp.down_proj",
}


# Gemma 4 Linears that read their own input (no sibling shares it).
OWN_INPUT = ("per_layer_input_gate", "per_layer_projection", "router.proj")
EXPERT_INPUTS = ("experts.gate_up_proj", "experts.down_proj")


@dataclass
class InputStats:
    """Statistics of one Linear input over all calibration tokens seen so far."""

    kinds: frozenset[str]
    count: int = 0
    absmax: torch.Tensor | None = None  # [in] float32
    abs_sum: torch.Tensor | None = None  # [in] float64
    sum_sq: torch.Tensor | None = None  # [in] float64
    xtx: torch.Tensor | None = None  # [in, in] float32
    xfx: torch.Tensor | None = None  # [in, in] float32, rows: float-model channel, columns: x's

    def update(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> None:
        """x [..., in]; ref: the float model's input for the same tokens (needed for "xfx")."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [T, in]
        self.count += x.shape[0]
        if "absmax" in self.kinds:
            m = x.abs().amax(0)
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if "abs_sum" in self.kinds:
            s = x.abs().sum(0, dtype=torch.float64)
            self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        if "sum_sq" in self.kinds:
            s = x.double().pow(2).sum(0)
            self.sum_sq = s if self.sum_sq is None else self.sum_sq + s
        if "xtx" in self.kinds:  # by jobs: the same sums on any thread count (threads.py)
            self.xtx = add_gram(self.xtx, x, x)
        if "xfx" in self.kinds:
            if ref is None:
                raise ValueError("xfx needs the float model's input (run_layers(float_target=True))")
            self.xfx = add_gram(self.xfx, ref.reshape(-1, x.shape[-1]).float(), x)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()


class ExpertStats:
    """Per-expert statistics of one fused expert weight's input: `per_expert[e]` saw only the tokens
    routed to expert e (None: no token was)."""

    def __init__(self, kinds, num_experts: int):
        self.kinds = frozenset(kinds)
        self.per_expert: list[InputStats | None] = [None] * num_experts

    def update_expert(self, e: int, x: torch.Tensor) -> None:
        st = self.per_expert[e]
        if st is None:
            st = self.per_expert[e] = InputStats(self.kinds)
        st.update(x)

    @property
    def counts(self) -> list[int]:
        return [0 if st is None else st.count for st in self.per_expert]

    @property
    def count(self) -> int:
        return sum(self.counts)

    def stacked(self, kind: str, width: int) -> torch.Tensor:
        """[E, width] of a vector statistic; zeros for experts that saw no token."""
        rows = [torch.zeros(width, dtype=torch.float64) if st is None else getattr(st, kind).double()
                for st in self.per_expert]
        return torch.stack(rows)


class Pairing:
    """Shared state of a paired pass (runner's float_target): while `float_pass` the hooks only store
    each hooked Linear's input in `inputs`; otherwise they update the statistics with `inputs` as ref."""

    def __init__(self):
        self.float_pass = False
        self.inputs: dict[str, torch.Tensor] = {}


def attach(layer: nn.Module, prefix: str, kinds, pair: Pairing | None = None
           ) -> tuple[dict[str, InputStats], list]:
    """Hook `layer` (a DecoderLayer); returns ({full Linear name: stats}, hook handles).

    `prefix` is the layer's HF prefix (`model.layers.3.`). Remove the handles when done.
    `pair` (needed for "xfx") pairs each token's input with the float model's, see `Pairing`.
    """
    kinds = frozenset(kinds)
    bad = kinds - set(KINDS)
    if bad:
        raise ValueError(f"unknown statistics {sorted(bad)} (allowed: {', '.join(KINDS)})")
    shared: dict[str, InputStats] = {}
    handles = []

    def hook(st, suffix, x):
        if pair is None:
            st.update(x)
        elif pair.float_pass:
            pair.inputs[suffix] = x.detach()
        else:
            st.update(x, pair.inputs[suffix])

    groups = input_groups(layer)
    for suffix in sorted(set(groups.values())):
        st = shared[suffix] = InputStats(kinds)
        mod = layer.get_submodule(suffix)
        handles.append(mod.register_forward_pre_hook(lambda _m, args, st=st, k=suffix: hook(st, k, args[0])))
    stats: dict = {prefix + s: shared[src] for s, src in groups.items()}
    if hasattr(layer, "experts"):
        if pair is not None:
            raise ValueError("paired (float-target) statistics are not supported for MoE experts")
        ex = {n: ExpertStats(kinds, layer.experts.num_experts) for n in EXPERT_INPUTS}
        layer.experts.observer = lambda e, which, x: ex[f"experts.{which}_proj"].update_expert(e, x)
        handles.append(_Detach(layer.experts))
        stats.update({prefix + n: st for n, st in ex.items()})
    return stats, handles


class _Detach:
    """A hook handle for the experts' observer."""

    def __init__(self, experts):
        self.experts = experts

    def remove(self) -> None:
        self.experts.observer = None


def input_groups(layer: nn.Module) -> dict[str, str]:
    """{suffix of each Linear the layer has: the hooked Linear whose input it reads}."""
    out = {s: src for s, src in INPUT_OF.items() if _has(layer, s)}
    out.update({s: s for s in OWN_INPUT if _has(layer, s)})
    return out


def _has(layer: nn.Module, suffix: str) -> bool:
    try:
        layer.get_submodule(suffix)
    except AttributeError:
        return False
    return True
