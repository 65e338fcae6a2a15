"""The registry of quantization schemes, keyed by the names users type (case-insensitive).

The CLI's choices, `gemmaquant schemes`, recipe validation and the README table all read SCHEMES.
Two families: compressed-tensors safetensors for vLLM, and GGUF presets for llama.cpp / llamafile.
"""

from __future__ import annotations

from dataclasses import dataclass
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
        """What --algorithm accepts for this scheme, the default first (GGUF schemes: none)."""
        combos = tuple(c for c, needs in COMBINED.items() if self.algorithms and set(needs) <= set(self.algorithms))
        return tuple(self.algorithms) + combos

    @property
    def needs_calibration(self) -> bool:
        """Static input scales and the non-RTN algorithms need activations."""
        static_act = self.input_activations is not None and not self.input_activations.dynamic
        return static_act or (bool(self.algorithms) and self.algorithms[0] != "rtn")


# compressed-tensors format -> the weight type it stores
CT_FORMATS = {"float-quantized": "float", "int-quantized": "int", "pack-quantized": "int"}


@dataclass(frozen=True)
class CTScheme(Scheme):
    """A compressed-tensors scheme: the format vLLM reads, the weights' and activations' arguments."""

    family: ClassVar[str] = CT
    ct_format: str = ""  # "float-quantized" | "int-quantized" | "pack-quantized"
    weights: QuantArgs | None = None
    input_activations: QuantArgs | None = None

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
        if self.algorithms:
            raise ValueError(f"GGUF scheme {self.name} takes no --algorithm (its searches are llama.cpp's)")
        if self.ftype < 0 or not self.default_type:
            raise ValueError(f"GGUF scheme {self.name} needs its llama.cpp file type and default tensor type")


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
]:
    _add(GGUFScheme(_name, _summary, "llama.cpp / llamafile / ollama", _name.upper(),
                    ftype=_ftype, default_type=_default))


def get_scheme(name: str) -> Scheme:
    key = name.strip().lower().replace("_", "-") if name else ""
    for s in SCHEMES.values():
        if key in (s.name, s.name.replace("_", "-")):
            return s
    raise GemmaQuantError(f"unknown scheme {name!r} (allowed: {', '.join(SCHEMES)})")


def _gguf_algorithms(s: Scheme) -> str:
    if s.default_type in ("BF16", "F16"):
        return "conversion only"
    if s.default_type == "Q8_0":
        return "llama.cpp's rounding (ignores an imatrix)"
    return "llama.cpp's scale search; optional --imatrix"


def scheme_table() -> list[dict]:
    """Rows for `gemmaquant schemes` and the README."""
    return [{"scheme": s.name, "format": s.family, "engine": s.engine, "what": s.summary,
             "algorithms": ", ".join(s.allowed_algorithms) if s.algorithms else _gguf_algorithms(s)}
            for s in SCHEMES.values()]


def scheme_markdown() -> str:
    """The README's scheme table (tests check the README carries exactly this)."""
    lines = ["| scheme | format | loads in | what | algorithms |", "|---|---|---|---|---|"]
    for r in scheme_table():
        lines.append(f"| `{r['scheme']}` | {r['format']} | {r['engine']} | {r['what']} | {r['algorithms']} |")
    return "\n".join(lines) + "\n"
