"""GGML block formats: byte-exact llama.cpp quantizers and gguf-exact dequantizers in torch."""

from gemmaquant.ggml.dequantize import dequantize
from gemmaquant.ggml.quantize import quantize
from gemmaquant.ggml.types import BLOCK, QK_K, GGMLType, ggml_type, row_bytes

__all__ = ["BLOCK", "QK_K", "GGMLType", "dequantize", "ggml_type", "quantize", "row_bytes"]
