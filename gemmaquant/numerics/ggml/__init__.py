"""GGML block formats: byte-exact llama.cpp quantizers and gguf-exact dequantizers in torch.

    from gemmaquant.numerics.ggml.quantize import quantize       # f32 rows -> GGUF blocks (llama.cpp's bytes)
    from gemmaquant.numerics.ggml.dequantize import dequantize   # GGUF blocks -> f32 (the gguf package's values)

The package itself only loads the block types, which need no torch: GGUF plans and the GGUF header
are built without paying torch's import.
"""

from gemmaquant.numerics.ggml.types import BLOCK, QK_K, GGMLType, ggml_type, row_bytes

__all__ = ["BLOCK", "QK_K", "GGMLType", "ggml_type", "row_bytes"]
