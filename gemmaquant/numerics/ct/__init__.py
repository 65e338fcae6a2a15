"""compressed-tensors numerics (pure torch): the formats (formats.py: one object per vLLM format),
the integer grid (grid.py), quantizers, int32 bit packing and dequantizers (plain, and compiled.py's
torch.compile path)."""

from .dequantize import dequantize, dequantize_fp8, dequantize_int8, dequantize_packed
from .formats import FORMATS, CTFormat, ct_format, dequantize_tensors, quantize_for
from .pack import pack_to_int32, unpack_from_int32
from .quantize import (FP8_MAX, SCALE_DTYPE, FloatQuantized, IntQuantized, Packed, PackQuantized, fp8_codes,
                       fp8_scale, int_codes, int_qparams, int_range, minmax, pack_int, quantize_fp8, quantize_int8, quantize_pack)

__all__ = [
    "FP8_MAX", "SCALE_DTYPE", "FloatQuantized", "IntQuantized", "PackQuantized", "Packed",
    "pack_to_int32", "unpack_from_int32", "minmax", "int_range", "int_qparams", "fp8_scale",
    "int_codes", "fp8_codes", "quantize_fp8", "quantize_int8", "quantize_pack", "pack_int", "quantize_for",
    "dequantize", "dequantize_fp8", "dequantize_int8", "dequantize_packed", "dequantize_tensors",
    "FORMATS", "CTFormat", "ct_format",
]
