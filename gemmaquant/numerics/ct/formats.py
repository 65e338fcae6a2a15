"""The three compressed-tensors formats, each one object that owns its behaviour: the tensors a Linear
becomes (suffix, dtype, shape), round-to-nearest quantization, dequantization of stored tensors, the
storing of a calibrated integer result, and its row of the `--dry-run` plan (type, bytes).

Keyed by the `format` string vLLM reads (FORMATS); a schemes.CTScheme names one, and the writer, the
plan, the loader and calibration call it instead of branching on the name. A new format is a new
class here plus its name in schemes.CT_FORMATS.
"""

from __future__ import annotations

import math

import torch

from .dequantize import dequantize_fp8, dequantize_int8, dequantize_packed
from .grid import WeightQuant
from .quantize import (SCALE_DTYPE, IntQuantized, Packed, pack_int, quantize_fp8, quantize_int8,
                       quantize_pack)

Tensor = torch.Tensor
Spec = tuple[str, torch.dtype, tuple[int, ...]]  # (suffix, dtype, shape) of one stored tensor


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

    def label(self, weights):
        return f"int8 per-{weights.strategy}"


class PackFormat(CTFormat):
    """`pack-quantized`: weight-only INT4/INT8 codes packed into int32, per group or channel, with
    zero points when asymmetric."""

    name = "pack-quantized"

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


FORMATS: dict[str, CTFormat] = {f.name: f for f in (FloatFormat(), IntFormat(), PackFormat())}


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
