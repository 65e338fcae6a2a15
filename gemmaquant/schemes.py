"""The registry of quantization schemes, keyed by the names users type (case-insensitive).

The CLI's choices, `gemmaquant schemes`, recipe validation and the README table all read SCHEMES.
Two families: compressed-tensors safetensors for vLLM, and GGUF presets for llama.cpp / llamafile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import ClassVar

from .errors import GemmaQuantError

CT, GGUF = "compressed-tensors", "gguf"


@dataclass(frozen=True)
class QuantArgs:
    """One compressed-tensors args object (weights or input activations)."""

    num_bits: int
    type: str  # "float" | "int"
    strategy: str  # "channel" | "tensor" | "group" | "token"
    symmetric: bool = True
    group_size: int | None = None
    dynamic: bool = False
    observer: str | None = "minmax"

    def __post_init__(self):
        if self.type not in ("float", "int"):
            raise ValueError(f"type {self.type!r}")
        if self.strategy == "group" and not self.group_size:
            raise ValueError("group strategy needs group_size")

    def to_config(self, actorder: str | None = None) -> dict:
        """The minimal key set every vLLM since ct 0.11 accepts (see docs/vllm-formats.md §0)."""
        return {
            "num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
            "group_size": self.group_size, "strategy": self.strategy, "block_structure": None,
            "dynamic": self.dynamic, "actorder": actorder, "observer": self.observer,
            "observer_kwargs": {},
        }


# Every --algorithm name, the one list: the CLI's help, recipes, calibration and the summary all read it.
# A scheme allows the base algorithms it lists plus the combinations they make (Scheme.allowed_algorithms).
ALGORITHMS = ("rtn", "gptq", "awq", "awq+gptq", "smoothquant", "smoothquant+gptq")
COMBINED = {"awq+gptq": ("awq", "gptq"), "smoothquant+gptq": ("smoothquant",)}  # combination -> what it needs
UNQUANTIZED = ("F32", "F16", "BF16")  # GGUF presets that convert only


@dataclass(frozen=True)
class Scheme:
    """What every scheme has; CTScheme and GGUFScheme add their family's fields and check them."""

    name: str  # what users type
    summary: str
    engine: str  # who loads the output
    label: str  # goes into default output names: gemma-2-9b-it-FP8-dynamic/, gemma-2-2b-it.Q6_K.gguf
    algorithms: tuple[str, ...] = ()  # allowed base algorithms, first is the default
    family: ClassVar[str] = ""
    # the other family's fields read as None, so code may ask any scheme
    ct_format: ClassVar[str | None] = None
    weights: ClassVar[QuantArgs | None] = None
    input_activations: ClassVar[QuantArgs | None] = None
    ftype: ClassVar[int | None] = None
    default_type: ClassVar[str | None] = None

    def __post_init__(self):
        unknown = [a for a in self.algorithms if a not in ALGORITHMS or a in COMBINED]
        if unknown:
            raise ValueError(f"scheme {self.name}: unknown base algorithm(s) {unknown} (allowed: "
                             f"{', '.join(a for a in ALGORITHMS if a not in COMBINED)})")

    @property
    def is_gguf(self) -> bool:
        return self.family == GGUF

    @property
    def allowed_algorithms(self) -> tuple[str, ...]:
        """What --algorithm accepts for this scheme, the default first (unquantized GGUF presets: none)."""
        combos = tuple(c for c, needs in COMBINED.items() if self.algorithms and set(needs) <= set(self.algorithms))
        return tuple(self.algorithms) + combos

    @property
    def needs_calibration(self) -> bool:
        """Static input scales and the non-RTN algorithms need activations."""
        static_act = self.input_activations is not None and not self.input_activations.dynamic
        return static_act or (bool(self.algorithms) and self.algorithms[0] != "rtn")


# Group sizes vLLM's WNA16 kernels (Marlin, dense and MoE) take; a recipe may pick one of them.
GROUP_SIZES = (32, 64, 128)


def check_ignore_pattern(p: str) -> str | None:
    """None if `p` is a usable compressed-tensors `ignore` entry (a module name, or `re:` + a regex
    matched from the start of the name, as compressed-tensors and vLLM match it); else why not."""
    if not p or p != p.strip():
        return "empty or padded with spaces"
    if p.startswith("re:"):
        try:
            re.compile(p[3:])
        except re.error as e:
            return f"not a valid regex ({e})"
    return None


# compressed-tensors format -> the weight type it stores
CT_FORMATS = {"float-quantized": "float", "int-quantized": "int", "pack-quantized": "int"}


@dataclass(frozen=True)
class CTScheme(Scheme):
    """A compressed-tensors scheme: the format vLLM reads, the weights' and activations' arguments."""

    family: ClassVar[str] = CT
    ct_format: str = ""  # "float-quantized" | "int-quantized" | "pack-quantized"
    weights: QuantArgs | None = None
    input_activations: QuantArgs | None = None
    extra_ignore: tuple[str, ...] = ()  # Linears a recipe leaves unquantized besides ct_rules.ignore_list

    def customized(self, group_size: int | None = None, ignore: tuple[str, ...] | list[str] = ()) -> "CTScheme":
        """This scheme with a recipe's group size (a group scheme, one of GROUP_SIZES) and extra
        `ignore` entries; the label (default output names) says a non-default group size."""
        s = self
        if group_size is not None and group_size != self.weights.group_size:
            if self.weights.strategy != "group" or group_size not in GROUP_SIZES:
                raise GemmaQuantError(f"group_size {group_size} does not apply to {self.name} (allowed: "
                                      + (", ".join(map(str, GROUP_SIZES)) if self.weights.strategy == "group"
                                         else "none: per-channel weights") + ")")
            s = replace(s, weights=replace(self.weights, group_size=group_size), label=f"{self.label}-G{group_size}")
        for p in ignore:
            why = check_ignore_pattern(p)
            if why:
                raise GemmaQuantError(f"ignore entry {p!r}: {why}")
        return replace(s, extra_ignore=tuple(ignore)) if ignore else s

    def __post_init__(self):
        super().__post_init__()
        if self.ct_format not in CT_FORMATS:
            raise ValueError(f"scheme {self.name}: compressed-tensors format {self.ct_format!r} "
                             f"(allowed: {', '.join(CT_FORMATS)})")
        if self.weights is None or self.weights.type != CT_FORMATS[self.ct_format]:
            raise ValueError(f"scheme {self.name}: {self.ct_format} needs {CT_FORMATS[self.ct_format]} weights")
        if self.ct_format == "pack-quantized" and self.input_activations is not None:
            raise ValueError(f"scheme {self.name}: pack-quantized is weight-only")
        if not self.algorithms:
            raise ValueError(f"scheme {self.name}: a compressed-tensors scheme names its algorithms")


@dataclass(frozen=True)
class GGUFScheme(Scheme):
    """A llama-quantize preset: llama.cpp's file type and the GGML type most 2-D tensors get."""

    family: ClassVar[str] = GGUF
    ftype: int = -1  # llama.cpp LlamaFileType (general.file_type)
    default_type: str = ""

    def __post_init__(self):
        super().__post_init__()
        if self.ftype < 0 or not self.default_type:
            raise ValueError(f"GGUF scheme {self.name} needs its llama.cpp file type and default tensor type")
        # rtn: llama.cpp's own rounding; gptq: error-feedback codes inside llama.cpp's blocks (same layout).
        # The others change the model's weights outside a block's grid, which a GGUF preset cannot carry.
        other = [a for a in self.algorithms if a not in ("rtn", "gptq")]
        if other:
            raise ValueError(f"GGUF scheme {self.name}: {other} (a GGUF preset takes rtn or gptq only)")
        if self.algorithms and self.default_type in UNQUANTIZED:
            raise ValueError(f"GGUF scheme {self.name} is not quantized: it takes no --algorithm")


_CH8F = QuantArgs(8, "float", "channel")
_TOKEN8F = QuantArgs(8, "float", "token", dynamic=True, observer=None)

SCHEMES: dict[str, Scheme] = {}


def _add(s: Scheme):
    SCHEMES[s.name] = s


_add(CTScheme("fp8", "FP8 E4M3 W8A8: per-channel weight scales, dynamic per-token activations",
            "vLLM (Hopper/Ada FP8; Marlin W8A16 fallback on Ampere)", "FP8-dynamic",
            ct_format="float-quantized", weights=_CH8F, input_activations=_TOKEN8F, algorithms=("rtn",)))
_add(CTScheme("fp8-static", "FP8 E4M3 W8A8: per-tensor weight scale, static per-tensor input scale from calibration",
            "vLLM (Hopper/Ada FP8)", "FP8",
            ct_format="float-quantized", weights=QuantArgs(8, "float", "tensor"),
            input_activations=QuantArgs(8, "float", "tensor", observer="minmax"), algorithms=("rtn",)))
_add(CTScheme("int8", "INT8 W8A8: per-channel symmetric weights, dynamic per-token activations, SmoothQuant",
            "vLLM (T4/Turing and newer; CUTLASS int8)", "INT8-W8A8",
            ct_format="int-quantized", weights=QuantArgs(8, "int", "channel"),
            input_activations=QuantArgs(8, "int", "token", dynamic=True, observer=None),
            algorithms=("smoothquant", "rtn")))
_add(CTScheme("int8-w8a16", "INT8 weight-only, per-channel symmetric, pack-quantized",
            "vLLM (Marlin/Machete WNA16)", "INT8-W8A16",
            ct_format="pack-quantized", weights=QuantArgs(8, "int", "channel"), algorithms=("rtn", "gptq")))
_add(CTScheme("w4a16", "INT4 weight-only, group 128, symmetric, pack-quantized, GPTQ",
            "vLLM (WNA16 kernels: Marlin/Machete on Ampere+)", "W4A16",
            ct_format="pack-quantized", weights=QuantArgs(4, "int", "group", group_size=128),
            algorithms=("gptq", "awq", "rtn")))
_add(CTScheme("w4a16-asym", "INT4 weight-only, group 128, asymmetric with zero points, pack-quantized, GPTQ",
            "vLLM >= 0.8.5 (zero points)", "W4A16-asym",
            ct_format="pack-quantized", weights=QuantArgs(4, "int", "group", symmetric=False, group_size=128),
            algorithms=("gptq", "awq", "rtn")))

# GGUF presets: llama.cpp's LlamaFileType values and default tensor types (docs/gguf-gemma.md §4.2).
# llama-quantize also accepts these names (its "alias for" entries); users type either.
GGUF_ALIASES = {"q3-k": "q3_k_m", "q4-k": "q4_k_m", "q5-k": "q5_k_m"}
for _name, _ftype, _default, _summary in [
    ("bf16", 32, "BF16", "unquantized bfloat16 (recommended unquantized format for Gemma)"),
    ("f16", 1, "F16", "unquantized float16 (Gemma activations may overflow fp16 engines)"),
    ("q8_0", 7, "Q8_0", "8-bit, 32-weight blocks; near-lossless"),
    ("q6_k", 18, "Q6_K", "6.56 bpw K-quant"),
    ("q5_k_m", 17, "Q5_K", "5-bit K-quant, attn_v/ffn_down bumped to Q6_K on some layers"),
    ("q5_k_s", 16, "Q5_K", "5-bit K-quant, small"),
    ("q4_k_m", 15, "Q4_K", "4-bit K-quant, attn_v/ffn_down bumped to Q6_K on some layers"),
    ("q4_k_s", 14, "Q4_K", "4-bit K-quant, small"),
    ("q4_0", 2, "Q4_0", "legacy 4-bit, 32-weight blocks"),
    # the rest of llama-quantize's list (tools/quantize/quantize.cpp); per-tensor rules: export/gguf/preset_rules.py
    ("q5_1", 9, "Q5_1", "legacy 5-bit with a per-block minimum, 32-weight blocks"),
    ("q5_0", 8, "Q5_0", "legacy 5-bit, 32-weight blocks"),
    ("q4_1", 3, "Q4_1", "legacy 4-bit with a per-block minimum, 32-weight blocks"),
    ("iq4_nl", 25, "IQ4_NL", "4.5 bpw non-linear levels, 32-weight blocks; attn_v Q5_K when n_head/n_kv >= 4"),
    ("iq4_xs", 30, "IQ4_XS", "4.25 bpw non-linear levels, 256-weight blocks"),
    ("q3_k_l", 13, "Q3_K", "3-bit K-quant, large: attn_v/attn_output/ffn_down Q5_K"),
    ("q3_k_m", 12, "Q3_K", "3-bit K-quant, medium: attn_v Q5_K/Q4_K, attn_output/ffn_down Q4_K"),
    ("q3_k_s", 11, "Q3_K", "3-bit K-quant, small"),
    ("iq3_m", 27, "IQ3_S", "3.66 bpw grid mix: attn_v/attn_output Q4_K, first ffn_down Q4_K"),
    ("iq3_s", 26, "IQ3_S", "3.44 bpw grid quantization"),
    ("iq3_xs", 22, "IQ3_S", "3.3 bpw grid mix: attn_q/k and middle ffn_gate/up IQ3_XXS"),
    ("iq3_xxs", 23, "IQ3_XXS", "3.06 bpw grid quantization; attn_q/k IQ2_S"),
    ("q2_k", 10, "Q2_K", "2-bit K-quant: attn_v Q3_K/Q4_K, attn_output/ffn_down Q3_K"),
    ("q2_k_s", 21, "Q2_K", "2-bit K-quant, small"),
    ("iq2_m", 29, "IQ2_S", "2.7 bpw grid mix: attn_v/attn_output IQ3_S"),
    ("iq2_s", 28, "IQ2_XS", "2.5 bpw grid mix: attn_v/attn_output IQ3_S"),
    ("iq2_xs", 20, "IQ2_XS", "2.31 bpw grid quantization"),
    ("iq2_xxs", 19, "IQ2_XXS", "2.06 bpw grid quantization"),
    ("iq1_m", 31, "IQ1_M", "1.75 bpw ternary grid; attn_output IQ2_XXS"),
    ("iq1_s", 24, "IQ1_S", "1.56 bpw ternary grid; attn_output IQ2_XXS"),
    ("tq2_0", 37, "TQ2_0", "2.06 bpw ternarization, for ternary-trained (BitNet-style) weights only"),
    ("tq1_0", 36, "TQ1_0", "1.69 bpw ternarization, for ternary-trained (BitNet-style) weights only"),
]:
    _add(GGUFScheme(_name, _summary, "llama.cpp / llamafile / ollama", _name.upper(),
                    algorithms=() if _default in UNQUANTIZED else ("rtn", "gptq"), ftype=_ftype, default_type=_default))

# llama-quantize presets gemmaquant does not write, with the reason (README "GGUF presets left out").
UNSUPPORTED_GGUF: dict[str, str] = {
    "q1_0": "Q1_0 is a 1-bit format for checkpoints trained for it (QAT), which Gemma's are not; "
            "the gguf package has no reference (de)quantizer for it",
    "q2_0": "Q2_0 is a 2-bit format for checkpoints trained for it (QAT); the gguf package cannot even name the type",
    "mxfp4_moe": "MXFP4 applies to mixture-of-experts tensors only: on a dense Gemma llama-quantize makes every "
                 "tensor Q8_0, so use q8_0",
    "f32": "32-bit floats double bf16's size and add nothing to bf16 Gemma weights: use bf16",
    "copy": "COPY re-packs an existing GGUF without quantizing; gemmaquant writes from the HF checkpoint: use bf16",
}

# Presets refused without an importance matrix (llama-quantize's "this quantization requires an imatrix"):
# their bulk types are too coarse to search without one. iq3_xxs/iq3_xs need one unless every IQ3_XXS/IQ2_S
# tensor fell back (row lengths not a multiple of 256, as on Gemma 3 270M and 1B): the plan decides.
GGUF_NEEDS_IMATRIX = frozenset({"iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m", "q2_k_s"})


# Bits per weight of each GGUF preset's whole file on the demo model (Gemma 3 270M: 8 x file bytes /
# weights; its 262144 x 640 embedding, Q8_0 in every quantized preset, and the vocabulary in the header
# weigh on every figure), with an imatrix only for the presets that need one. Produced by
# benchmarks/bench_gguf_presets.py (RESULTS.md, "Every GGUF preset on the demo"); tests check it.
DEMO_BPW: dict[str, float] = {
    "bf16": 16.198, "f16": 16.198, "q8_0": 8.700, "q6_k": 8.444, "q5_k_m": 7.759, "q5_k_s": 7.699,
    "q4_k_m": 7.553, "q4_k_s": 7.457, "q4_0": 7.204, "q5_1": 7.765, "q5_0": 7.578, "q4_1": 7.391,
    "iq4_nl": 7.230, "iq4_xs": 7.199, "q3_k_l": 7.352, "q3_k_m": 7.220, "q3_k_s": 7.063, "iq3_m": 7.131,
    "iq3_s": 7.074, "iq3_xs": 7.074, "iq3_xxs": 7.085, "q2_k": 7.074, "q2_k_s": 6.985, "iq2_m": 7.006,
    "iq2_s": 6.986, "iq2_xs": 6.929, "iq2_xxs": 6.898, "iq1_m": 6.874, "iq1_s": 6.859, "tq2_0": 6.882,
    "tq1_0": 6.832,
}


def get_scheme(name: str) -> Scheme:
    key = name.strip().lower().replace("_", "-") if name else ""
    for s in SCHEMES.values():
        if key in (s.name, s.name.replace("_", "-")):
            return s
    if key in GGUF_ALIASES:
        return SCHEMES[GGUF_ALIASES[key]]
    why = UNSUPPORTED_GGUF.get(key.replace("-", "_"))
    if why is not None:
        raise GemmaQuantError(f"GGUF preset {name!r} is not supported: use llama-quantize ({why})")
    raise GemmaQuantError(f"unknown scheme {name!r} (allowed: {', '.join(SCHEMES)})")


def _gguf_algorithms(s: Scheme) -> str:
    if s.default_type in UNQUANTIZED:
        return "conversion only"
    gptq = "; `--algorithm gptq`: error-feedback codes from calibration"
    if s.default_type == "Q8_0":
        return "llama.cpp's rounding (ignores an imatrix)" + gptq
    if s.name in GGUF_NEEDS_IMATRIX:
        return "llama.cpp's search; needs --imatrix or --imatrix-file" + gptq
    if s.name in ("iq3_xxs", "iq3_xs"):
        return "llama.cpp's search; needs an imatrix unless its IQ3_XXS/IQ2_S rows fall back (Gemma 3 270M, 1B)" + gptq
    return "llama.cpp's scale search; optional --imatrix" + gptq


def scheme_table() -> list[dict]:
    """Rows for `gemmaquant schemes` and the README."""
    return [{"scheme": s.name, "format": s.family, "engine": s.engine, "what": s.summary,
             "algorithms": _gguf_algorithms(s) if s.is_gguf else ", ".join(s.allowed_algorithms),
             "demo_bpw": DEMO_BPW.get(s.name)}
            for s in SCHEMES.values()]


def scheme_markdown() -> str:
    """The README's scheme table (tests check the README carries exactly this)."""
    lines = ["| scheme | format | loads in | what | algorithms | bits/weight, demo |", "|---|---|---|---|---|---:|"]
    for r in scheme_table():
        bpw = f"{r['demo_bpw']:.2f}" if r["demo_bpw"] is not None else ""
        lines.append(f"| `{r['scheme']}` | {r['format']} | {r['engine']} | {r['what']} | {r['algorithms']} | {bpw} |")
    return "\n".join(lines) + "\n"
