"""llama-quantize's per-tensor type rules for Gemma, as a table keyed by preset.

Source: `src/llama-quant.cpp` of the pinned llama.cpp (llama_tensor_get_type_impl, tensor_type_fallback,
tensor_requires_imatrix), restricted to what can happen on Gemma 1-3: dense (no experts), separate
q/k/v, never Falcon or 70B. llama.cpp writes these rules as one if/else chain per tensor category; here
each preset has one row, RULES[preset][category], a rule string read left to right, first match wins:

    "Q6_K if more_bits"               Q6_K where the condition holds, else the preset's default type
    "Q5_K if i<2 | Q4_K"              alternatives; a bare type always matches
    "Q4_K if i<n/8 & no_imatrix"      conditions joined by &

Conditions (CONDITIONS): `i` is the tensor's position among its category's tensors in llama.cpp's
order (attn_v: among attn_v tensors; ffn_*: the layer), `n` the category's count (attn_v: the number of
attn_v tensors, ffn_*: n_layer), integer division throughout:

    gqa4        n_head / n_head_kv of layer 0 >= 4 (Gemma 1 2B, Gemma 3 270M and 1B)
    gqa4_or_moe4  gqa4, or >= 4 experts per layer (llama.cpp reads n_expert only in the very-low-bit branch)
    more_bits   llama.cpp's use_more_bits(i, n): i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2
    i<2, i<4, i<n/8, i<n/16, middle (n/8 <= i < 7n/8)
    imatrix, no_imatrix

Categories: `output` (output.weight, and token_embd when the head is tied, as in every Gemma: Q8_0
first when its row length is not a multiple of the default type's block), `token_embd` (an untied
model's embedding), attn_v, attn_k, attn_q, attn_output, ffn_down, ffn_gate_up. Norms and 1-D tensors
stay F32 and the F16/BF16 presets apply no rule (plan.py). After the rule, `fallback` demotes a type
whose block does not divide the row length, as llama-quantize does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...errors import GemmaQuantError
from ...numerics.ggml.types import BLOCK, GGMLType

T = GGMLType
CATEGORIES = ("output", "token_embd", "attn_v", "attn_k", "attn_q", "attn_output", "ffn_down", "ffn_gate_up")


def use_more_bits(i: int, n: int) -> bool:
    """llama-quantize's layer pick for *_M presets (integer division); n=18 -> {0,1,4,7,10,13,15,16,17}."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Where:
    """What a rule may look at: the tensor's position in its category, the model, the run."""
    i: int
    n: int
    n_gqa: int
    has_imatrix: bool
    n_expert: int = 1  # experts per MoE layer (Gemma 4 26B-A4B: 128); 1 on dense models


CONDITIONS: dict[str, Callable[[Where], bool]] = {
    "gqa4": lambda w: w.n_gqa >= 4,
    "gqa4_or_moe4": lambda w: w.n_gqa >= 4 or w.n_expert >= 4,  # only the very-low-bit branch reads n_expert
    "more_bits": lambda w: use_more_bits(w.i, w.n),
    "i<2": lambda w: w.i < 2,
    "i<4": lambda w: w.i < 4,
    "i<n/8": lambda w: w.i < w.n // 8,
    "i<n/16": lambda w: w.i < w.n // 16,
    "middle": lambda w: w.n // 8 <= w.i < 7 * w.n // 8,
    "imatrix": lambda w: w.has_imatrix,
    "no_imatrix": lambda w: not w.has_imatrix,
}

# The very-low-bit presets share one branch in llama.cpp: attn_v Q4_K on n_gqa >= 4 models (or >= 4 experts), else a
# "low" type (IQ3_S for iq2_s/iq2_m, Q2_K for the rest), which also takes the first n/8 ffn_down.
_LOW_IQ = {"iq2_xxs": "Q2_K", "iq2_xs": "Q2_K", "iq1_s": "Q2_K", "iq1_m": "Q2_K", "iq2_s": "IQ3_S", "iq2_m": "IQ3_S"}

RULES: dict[str, dict[str, str]] = {
    "q8_0": {},  # output: the default already
    "q6_k": {"output": "Q6_K"},
    "q5_k_m": {"output": "Q6_K", "attn_v": "Q6_K if more_bits", "ffn_down": "Q6_K if more_bits"},
    "q5_k_s": {"output": "Q6_K"},
    "q4_k_m": {"output": "Q6_K", "attn_v": "Q6_K if more_bits", "ffn_down": "Q6_K if more_bits"},
    "q4_k_s": {"output": "Q6_K", "attn_v": "Q5_K if i<4", "ffn_down": "Q5_K if i<n/8"},
    "q5_1": {"output": "Q6_K"},
    "q5_0": {"output": "Q6_K", "ffn_down": "Q5_1 if imatrix & i<n/8"},
    "q4_1": {"output": "Q6_K"},
    "q4_0": {"output": "Q6_K", "ffn_down": "Q4_1 if imatrix & i<n/8"},
    "iq4_nl": {"output": "Q6_K", "attn_v": "Q5_K if gqa4", "ffn_down": "Q5_K if i<n/8 & no_imatrix"},
    "iq4_xs": {"output": "Q6_K", "attn_v": "Q5_K if gqa4", "ffn_down": "Q5_K if i<n/8 & no_imatrix"},
    "q3_k_l": {"output": "Q6_K", "attn_v": "Q5_K", "attn_output": "Q5_K", "ffn_down": "Q5_K"},
    "q3_k_m": {"output": "Q6_K", "attn_v": "Q5_K if i<2 | Q4_K", "attn_output": "Q4_K",
               "ffn_down": "Q5_K if i<n/16 | Q4_K"},
    "q3_k_s": {"output": "Q6_K"},
    "iq3_m": {"output": "Q6_K", "attn_v": "Q4_K", "attn_output": "Q4_K", "ffn_down": "Q4_K if i<n/8"},
    "iq3_s": {"output": "Q6_K", "attn_v": "Q4_K if gqa4"},
    "iq3_xs": {"output": "Q6_K", "attn_v": "Q4_K if gqa4", "attn_k": "IQ3_XXS", "attn_q": "IQ3_XXS",
               "ffn_gate_up": "IQ3_XXS if middle"},
    "iq3_xxs": {"output": "Q5_K", "token_embd": "IQ3_S", "attn_v": "Q4_K if gqa4 | IQ3_S if no_imatrix",
                "attn_k": "IQ2_S", "attn_q": "IQ2_S", "attn_output": "IQ3_S",
                "ffn_down": "Q4_K if no_imatrix & i<n/8 | Q3_K if no_imatrix"},
    "q2_k": {"output": "Q6_K", "attn_v": "Q4_K if gqa4 | Q3_K", "attn_output": "Q3_K", "ffn_down": "Q3_K"},
    "q2_k_s": {"output": "Q6_K", "attn_v": "Q4_K if gqa4", "ffn_down": "Q4_K if i<n/8"},
    **{p: {"output": "Q5_K", "token_embd": low, "attn_v": f"Q4_K if gqa4_or_moe4 | {low}", "ffn_down": f"{low} if i<n/8",
           **({"attn_output": "IQ2_XXS"} if p.startswith("iq1") else {"attn_output": "IQ3_S"} if low == "IQ3_S" else {})}
       for p, low in _LOW_IQ.items()},
    "tq2_0": {"output": "Q6_K", "token_embd": "Q4_K"},
    "tq1_0": {"output": "Q6_K", "token_embd": "Q4_K"},
}

# The types llama-quantize refuses to produce without an imatrix (tensor_requires_imatrix), except
# in token_embd / output; Q2_K counts only for the q2_k_s preset.
IMATRIX_TYPES = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})

# tensor_type_fallback: the type llama-quantize uses when the row length is not a multiple of the
# block; types with a 32-weight block stand for themselves; F16 when even that does not divide.
FALLBACK = {
    **{t: T.IQ4_NL for t in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS)},
    **{t: T.Q4_0 for t in (T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0)},
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}


def _parse(rule: str, where: str) -> tuple[tuple[tuple[str, ...], GGMLType], ...]:
    alts = []
    for alt in rule.split("|"):
        head, _, cond = alt.strip().partition(" if ")
        conds = tuple(c.strip() for c in cond.split("&")) if cond else ()
        bad = [c for c in conds if c not in CONDITIONS]
        if head not in T.__members__ or bad:
            raise ValueError(f"{where}: bad rule {rule!r}")
        alts.append((conds, T[head]))
    return tuple(alts)


def _parse_table() -> dict[str, dict[str, tuple]]:
    """RULES checked and parsed once at import: a typo in the table fails every test, not one preset."""
    out = {}
    for p, row in RULES.items():
        unknown = set(row) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"{p}: unknown categories {sorted(unknown)}")
        out[p] = {c: _parse(r, f"{p}.{c}") for c, r in row.items()}
    return out


_PARSED = _parse_table()


def category(name: str, tied: bool) -> str | None:
    """The rule category of a GGUF tensor name (llama.cpp's tensor_get_category, Gemma's tensors)."""
    # llama.cpp's token-embedding category holds Gemma 4's per-layer table too
    embd = name in ("token_embd.weight", "per_layer_token_embd.weight")
    if name == "output.weight" or (tied and embd):
        return "output"
    if embd:
        return "token_embd"
    for key, cat in (("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_gate_up"),
                     ("ffn_gate", "ffn_gate_up"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return None


def rule_type(preset: str, cat: str | None, default: GGMLType, ncols: int, where: Where) -> tuple[GGMLType, str]:
    """The type llama-quantize's rules give a tensor of `cat`, before the fallback, and why."""
    if cat == "output":
        if ncols % BLOCK[default][0] != 0:
            return T.Q8_0, f"output: {ncols} % {BLOCK[default][0]} ≠ 0 -> Q8_0"
    for conds, t in _PARSED[preset].get(cat, ()):
        if all(CONDITIONS[c](where) for c in conds):
            pos = f" {where.i}/{where.n}" if any(c.startswith("i<") or c in ("more_bits", "middle") for c in conds) else ""
            return t, f"{cat}{pos}: {' & '.join(conds) or 'preset rule'} -> {t.name}"
    return default, f"default {default.name}"


def fallback(t: GGMLType, ncols: int) -> tuple[GGMLType, str | None]:
    """llama-quantize's demotion when `ncols` is not a multiple of t's block (None: no fallback)."""
    block = BLOCK[t][0]
    if ncols % block == 0:
        return t, None
    if t in FALLBACK:
        new = FALLBACK[t]
    elif block <= 32:
        new = t
    else:
        raise GemmaQuantError(f"no fallback type is defined for {t.name} with rows of {ncols} (llama-quantize refuses too)")
    if ncols % BLOCK[new][0] != 0:
        new = T.F16
    return new, f"fallback: {ncols} % {block} ≠ 0 -> {new.name}"


def requires_imatrix(preset: str, name: str, t: GGMLType) -> bool:
    """llama-quantize's tensor_requires_imatrix, on the final (post-fallback) type."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):  # Gemma 4's PLE table too
        return False
    return t in IMATRIX_TYPES or (t == T.Q2_K and preset == "q2_k_s")
