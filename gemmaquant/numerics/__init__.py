"""Pure torch per format family, no files and no model: values in, blocks or codes out, and back.

    ggml/   GGUF block types (one module per type family: its quantize, scale searches and dequantize;
            the fused/compiled dequantizers beside them; types.py the block geometry)
    ct/     compressed-tensors: the integer grid, FP8, int32 packing, dequantize
"""
