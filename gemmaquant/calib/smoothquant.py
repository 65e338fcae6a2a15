"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438) for INT8 W8A8 with per-token dynamic activations.

Per-token int8 activation quantization loses the small channels of a token when a few channels carry
outliers (Gemma's GeGLU output into down_proj is the worst). SmoothQuant divides input channel j by

    s_j = max|X_j|^α / max|W_:,j|^(1−α)          (α = migration strength, 0.5 in the paper)

and multiplies weight column j by s_j, moving the difficulty from activations (per-token grid) into the
weights (per-output-channel grid, which absorbs column scaling well). The divisions are folded into the
producing norm or Linear exactly (see `fold.py`); the float model is unchanged.
"""

from __future__ import annotations

import torch

from ..model.gemma import DecoderLayer
from .fold import MAPPINGS, applies, consumer_names, consumers, fold, q_to_kv_max
from .stats import InputStats

_EPS = 1e-5


def smooth_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel SmoothQuant scale; 1 where either side is all zero (nothing to migrate)."""
    a, w = act_absmax.float(), w_absmax.float()
    s = a.clamp(min=_EPS).pow(alpha) / w.clamp(min=_EPS).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s))


def smooth_layer(layer: DecoderLayer, stats: dict[str, InputStats], *, alpha: float = 0.5,
                 mappings=MAPPINGS, stored_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Smooth one decoder layer in place from float input abs-max statistics.

    `stats` is keyed by Linear suffix (`self_attn.q_proj`, ...). Returns {norm attribute: new stored
    weight} for the norms that changed (the Linears changed in place). XᵀX statistics, when present,
    are rescaled to the smoothed inputs.
    """
    bad = set(mappings) - set(MAPPINGS)
    if bad:
        raise ValueError(f"unknown smoothing mappings {sorted(bad)} (allowed: {', '.join(MAPPINGS)})")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha {alpha} is outside [0, 1]")
    norms = {}
    for mapping in (m for m in mappings if applies(layer, m)):
        act = stats[consumer_names(mapping, layer)[0]].absmax
        w = torch.cat([lin.weight.detach() for lin in consumers(layer, mapping)]).abs().amax(0)
        if mapping == "o":  # one scale per V channel, shared by the query heads of its KV group
            act, w = q_to_kv_max(layer, act), q_to_kv_max(layer, w)
        s_eff, name, new_w = fold(layer, mapping, smooth_scales(act, w, alpha), stored_dtype)
        if name is not None:
            norms[name] = new_w
        st = stats[consumer_names(mapping, layer)[0]]
        if st.xtx is not None:  # for GPTQ after smoothing: the consumers now read x / s_eff
            st.xtx = st.xtx / (s_eff[:, None] * s_eff[None, :])
    return norms
