"""The three compressed-tensors formats, each one object that owns its behaviour: the tensors a Linear
becomes (suffix, dtype, shape), round-to-nearest quantization, dequantization of stored tensors, the
storing of a calibrated integer result, its row of the `--dry-run` plan (type, bytes), and the loading
of a Linear's stored tensors back (checked against [n, k] and the config group, as a `Loaded`).

Keyed by the `format` string vLLM reads (FORMATS); a schemes.CTScheme names one, and the writer, the
plan, the loader and calibration call it instead of branching on the name. A new format is a new
class here plus its name in schemes.CT_FORMATS. DENSE is the unquantized Linear a checkpoint keeps
(an ignored layer, the embedding): it loads, it is never written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ...errors import GemmaQuantError
from .dequantize import dequantize_fp8, dequantize_int8, dequantize_packed
from .grid import WeightQuant
from .quantize import (SCALE_DTYPE, IntQuantized, Packed, pack_int, quantize_fp8, quantize_int8,
                       quantize_pack)

Tensor = torch.Tensor
Spec = tuple[str, torch.dtype, tuple[int, ...]]  # (suffix, dtype, shape) of one stored tensor


class Stored(Protocol):
    """One Linear's tensors in a checkpoint, by suffix (`weight`, `weight_scale`, ...). The loader
    (evaluate/ct_artifact.py) names them; errors name `where` (the directory) and `name(suffix)`."""

    where: str
    module: str

    def name(self, suffix: str) -> str: ...

    def has(self, suffix: str) -> bool: ...

    def dtype(self, suffix: str) -> torch.dtype: ...

    def get(self, suffix: str) -> Tensor: ...  # one-line GemmaQuantError when missing or corrupt


@dataclass(frozen=True)
class Loaded:
    """A Linear's stored tensors as read and checked: `format` (a FORMATS key or "dense") decides the
    module the evaluate layer builds; `act` is how activations are quantized (None, "dynamic",
    "static"; static ones come with `input_scale`)."""

    format: str
    tensors: dict[str, Tensor]
    num_bits: int
    act: str | None = None


def _shaped(st: Stored, suffix: str, t: Tensor, want) -> Tensor:
    if tuple(t.shape) != tuple(want):
        raise GemmaQuantError(f"{st.where}: tensor '{st.name(suffix)}' has shape {list(t.shape)}, config.json "
                              f"implies {list(want)}")
    return t


def _optional(st: Stored, *suffixes: str) -> dict[str, Tensor]:
    return {s: st.get(s) for s in suffixes if st.has(s)}


def _weight(st: Stored, n: int, k: int, dtype: torch.dtype, fmt: str) -> Tensor:
    """`weight` [n, k] in `dtype` (the one tensor float- and int-quantized Linears are named by)."""
    if not st.has("weight"):
        raise GemmaQuantError(f"{st.where}: no tensor '{st.name('weight')}' (format {fmt!r} stores it)")
    if st.dtype("weight") != dtype:
        raise GemmaQuantError(f"{st.where}: tensor '{st.name('weight')}' has dtype {st.dtype('weight')} "
                              f"(format {fmt!r} stores {dtype})")
    return _shaped(st, "weight", st.get("weight"), (n, k))


def _input_scale(st: Stored, act: str | None) -> dict[str, Tensor]:
    if act == "static" and not st.has("input_scale"):
        raise GemmaQuantError(f"{st.where}: {st.module}: static input activations but no "
                              f"'{st.name('input_scale')}'")
    return _optional(st, "input_scale")


def _per_row_scale(st: Stored, n: int) -> Tensor:
    """`weight_scale` per channel ([n, 1] or [n]) or per tensor ([1] or [])."""
    scale = st.get("weight_scale")
    if scale.numel() not in (1, n) or scale.ndim > 2:
        raise GemmaQuantError(f"{st.where}: tensor '{st.name('weight_scale')}' has shape {list(scale.shape)}; "
                              f"expected [{n}, 1] (per channel) or [1] (per tensor)")
    return scale


class CTFormat:
    name: str = ""

    def outputs(self, n: int, k: int, weights, input_activations) -> list[Spec]:
        """What an [n, k] Linear is stored as."""
        raise NotImplementedError

    def quantize(self, w: Tensor, weights, input_scale=None) -> Packed:
        """Round-to-nearest of a weight already in its compute dtype."""
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, Tensor], num_bits: int) -> Tensor:
        """The weight from {suffix: tensor} as read back from a checkpoint."""
        raise NotImplementedError

    def from_grid(self, q: WeightQuant) -> Packed:
        """A calibrated integer result (GPTQ, AWQ, SmoothQuant + RTN) in this format's tensors."""
        raise ValueError(f"no integer results for compressed-tensors format {self.name!r}")

    def plan_row(self, n: int, k: int, weights, input_activations) -> tuple[str, int]:
        """(type as the plan shows it, stored bytes of the Linear)."""
        return self.label(weights), sum(math.prod(s) * d.itemsize for _, d, s in self.outputs(n, k, weights,
                                                                                              input_activations))

    def label(self, weights) -> str:
        raise NotImplementedError

    def load(self, st: Stored, n: int, k: int, weights: dict, act: str | None) -> Loaded:
        """A [n, k] Linear's stored tensors, checked; `weights` is its config group's `weights`
        entry as config.json has it, `act` how its group quantizes activations."""
        raise NotImplementedError


def _static(input_activations) -> bool:
    return input_activations is not None and not input_activations.dynamic


class FloatFormat(CTFormat):
    """`float-quantized`: FP8 E4M3 weights, per-channel or per-tensor scales, an input scale when static."""

    name = "float-quantized"

    def outputs(self, n, k, weights, input_activations):
        outs = [("weight", torch.float8_e4m3fn, (n, k)),
                ("weight_scale", SCALE_DTYPE, (n, 1) if weights.strategy == "channel" else (1,))]
        if _static(input_activations):
            outs.append(("input_scale", SCALE_DTYPE, (1,)))
        return outs

    def quantize(self, w, weights, input_scale=None):
        return quantize_fp8(w, weights.strategy, input_scale=input_scale)

    def dequantize(self, tensors, num_bits):
        return dequantize_fp8(tensors["weight"], tensors["weight_scale"])

    def load(self, st, n, k, weights, act):
        w = _weight(st, n, k, torch.float8_e4m3fn, self.name)
        return Loaded(self.name, {"weight": w, "weight_scale": _per_row_scale(st, n), **_input_scale(st, act)},
                      8, act)

    def label(self, weights):
        return f"fp8 e4m3 per-{weights.strategy}"


class IntFormat(CTFormat):
    """`int-quantized`: INT8 symmetric per-channel weights (W8A8)."""

    name = "int-quantized"

    def outputs(self, n, k, weights, input_activations):
        return [("weight", torch.int8, (n, k)), ("weight_scale", SCALE_DTYPE, (n, 1))]

    def quantize(self, w, weights, input_scale=None):
        if input_scale is not None:
            raise ValueError(f"{self.name} with dynamic or no activations takes no input scale")
        if weights.num_bits != 8 or weights.strategy != "channel" or not weights.symmetric:
            raise ValueError("int-quantized supports INT8 symmetric per-channel weights only")
        return quantize_int8(w)

    def dequantize(self, tensors, num_bits):
        return dequantize_int8(tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero_point"))

    def from_grid(self, q):
        if q.bits != 8 or q.group_size is not None or q.zero_point is not None:
            raise ValueError("int-quantized holds symmetric per-channel INT8 only")
        return IntQuantized(weight=q.codes, weight_scale=q.scale)

    def load(self, st, n, k, weights, act):
        w = _weight(st, n, k, torch.int8, self.name)
        if st.has("weight_zero_point"):
            raise GemmaQuantError(f"{st.where}: {st.module}: asymmetric int-quantized weights are not supported")
        scales = {"weight_scale": _per_row_scale(st, n), **_input_scale(st, act),
                  **_optional(st, "input_zero_point")}
        return Loaded(self.name, {"weight": w, **scales}, 8, act)

    def label(self, weights):
        return f"int8 per-{weights.strategy}"


class PackFormat(CTFormat):
    """`pack-quantized`: weight-only INT4/INT8 codes packed into int32, per group or channel, with
    zero points when asymmetric."""

    name = "pack-quantized"
    BITS = (4, 8)  # what vLLM's and ct's unpackers take

    def outputs(self, n, k, weights, input_activations):
        groups = k // weights.group_size if weights.strategy == "group" else 1
        outs = [("weight_packed", torch.int32, (n, -(-k * weights.num_bits // 32))),
                ("weight_scale", SCALE_DTYPE, (n, groups)),
                ("weight_shape", torch.int64, (2,))]
        if not weights.symmetric:
            outs.append(("weight_zero_point", torch.int32, (-(-n * weights.num_bits // 32), groups)))
        return outs

    def quantize(self, w, weights, input_scale=None):
        if input_scale is not None:
            raise ValueError(f"{self.name} with dynamic or no activations takes no input scale")
        return quantize_pack(w, weights.num_bits, symmetric=weights.symmetric,
                             group_size=weights.group_size if weights.strategy == "group" else None)

    def dequantize(self, tensors, num_bits):
        return dequantize_packed(tensors["weight_packed"], tensors["weight_scale"], tensors["weight_shape"],
                                 num_bits, tensors.get("weight_zero_point"))

    def from_grid(self, q):
        return pack_int(q.codes, q.scale, q.zero_point, q.bits)

    def load(self, st, n, k, weights, act):
        bits = int(weights.get("num_bits", 4))
        if bits not in self.BITS:
            raise GemmaQuantError(f"{st.where}: {st.module}: pack-quantized num_bits {bits} "
                                  f"(allowed: {', '.join(map(str, self.BITS))})")
        if not st.has("weight_packed"):
            raise GemmaQuantError(f"{st.where}: no tensor '{st.name('weight_packed')}' (format {self.name!r} "
                                  "stores it)")
        shape = tuple(int(v) for v in st.get("weight_shape").tolist())
        _shaped(st, "weight_shape", torch.empty(shape, device="meta"), (n, k))
        packed = _shaped(st, "weight_packed", st.get("weight_packed"), (n, -(-k * bits // 32)))
        scale = st.get("weight_scale")
        if scale.ndim != 2 or scale.shape[0] != n or k % scale.shape[1]:
            raise GemmaQuantError(f"{st.where}: tensor '{st.name('weight_scale')}' has shape {list(scale.shape)}; "
                                  f"expected [{n}, G] with G dividing {k}")
        out = {"weight_packed": packed, "weight_scale": scale, **_input_scale(st, act)}
        if st.has("weight_zero_point"):
            out["weight_zero_point"] = _shaped(st, "weight_zero_point", st.get("weight_zero_point"),
                                               (-(-n * bits // 32), scale.shape[1]))
        return Loaded(self.name, out, bits, act)

    def plan_row(self, n, k, weights, input_activations):
        # codes as the bits they take (the packed words' rounding is a few bytes per row)
        groups = k // weights.group_size if weights.strategy == "group" else 1
        b = n * k * weights.num_bits // 8 + n * groups * 2 + 16
        if not weights.symmetric:
            b += math.ceil(n * weights.num_bits / 32) * groups * 4
        return self.label(weights), b

    def label(self, weights):
        return f"int{weights.num_bits} packed" + (f" g{weights.group_size}" if weights.strategy == "group"
                                                  else " per-channel")


class DenseFormat(CTFormat):
    """An unquantized Linear (a layer in `ignore`, the embedding): `weight` in a float dtype, as stored."""

    name = "dense"

    def dequantize(self, tensors, num_bits):
        return tensors["weight"]

    def load(self, st, n, k, weights=None, act=None):
        w = _shaped(st, "weight", st.get("weight"), (n, k))
        if not w.is_floating_point() or w.dtype == torch.float8_e4m3fn:
            raise GemmaQuantError(f"{st.where}: tensor '{st.name('weight')}' has dtype {w.dtype} (an unquantized "
                                  "Linear is bfloat16, float16 or float32)")
        return Loaded(self.name, {"weight": w}, w.dtype.itemsize * 8)


FORMATS: dict[str, CTFormat] = {f.name: f for f in (FloatFormat(), IntFormat(), PackFormat())}
DENSE = DenseFormat()


def stored_format(declared: str | None, st: Stored) -> CTFormat:
    """The format that loads a Linear: the one its config group (or quantization_config) declares, or,
    where that names none of FORMATS (llm-compressor's `mixed-precision`, `naive-quantized`, `dense`,
    or a Linear no group targets), the one its stored tensors are."""
    if declared in FORMATS:
        return FORMATS[declared]
    if st.has("weight_packed"):
        return FORMATS[PackFormat.name]
    if not st.has("weight"):
        raise GemmaQuantError(f"{st.where}: no tensor '{st.name('weight')}' or '{st.name('weight_packed')}'")
    dtype = st.dtype("weight")
    by_dtype = {torch.float8_e4m3fn: FloatFormat.name, torch.int8: IntFormat.name}
    if dtype in by_dtype:
        return FORMATS[by_dtype[dtype]]
    if dtype.is_floating_point:
        return DENSE
    raise GemmaQuantError(f"{st.where}: tensor '{st.name('weight')}' has dtype {dtype} (format {declared!r})")


def ct_format(name: str) -> CTFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"compressed-tensors format {name!r} (allowed: {', '.join(FORMATS)})") from None


def quantize_for(w: Tensor, fmt: str, args, *, input_scale=None, compute_dtype: torch.dtype = torch.float32) -> Packed:
    """Round-to-nearest for one scheme: `args` is the scheme's weight QuantArgs (schemes.py).
    Scales come out bf16; the division and rounding run in `compute_dtype` (see quantize.py's doc)."""
    if w.dtype.itemsize < compute_dtype.itemsize:
        w = w.to(compute_dtype)
    return ct_format(fmt).quantize(w, args, input_scale=input_scale)


def dequantize_tensors(tensors: dict[str, Tensor], fmt: str, num_bits: int = 8) -> Tensor:
    """Dequantize from {suffix: tensor} as read back from a checkpoint (`weight`, `weight_scale`, ...)."""
    return ct_format(fmt).dequantize(tensors, num_bits)
