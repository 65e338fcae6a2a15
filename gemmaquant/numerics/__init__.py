"""Pure torch per format family, no files and no model: values in, blocks or codes out, and back.

    ggml/         GGUF block types: one module per type family declaring its types' quantize,
                  eager and fused dequantize (registry.py assembles them); types.py the block geometry
    ct/           compressed-tensors: the integer grid, FP8, int32 packing, dequantize (plain and compiled)
    compiling.py  the on/off switch and bit-check fallback shared by both families' torch.compile kernels
"""
