"""GGML block formats: byte-exact llama.cpp quantizers and gguf-exact dequantizers in torch.

    from gemmaquant.numerics.ggml.quantize import quantize       # f32 rows -> GGUF blocks (llama.cpp's bytes)
    from gemmaquant.numerics.ggml.dequantize import dequantize   # GGUF blocks -> f32 (the gguf package's values)

One module per type family declares its types (`TYPES`, a `family.GGMLKernels` each: quantizer,
eager and fused dequantizer, whether an imatrix is required): floats, legacy (Q4_0..Q8_0), kquants
(Q4_K..Q6_K), kquants_low (Q2_K, Q3_K), iq4, iq3, iq2, iq1, ternary (TQ*). `registry.py` assembles
them; `quantize.py`, `dequantize.py` and `compiled.py` dispatch through it. Shared pieces: `search.py`
(llama.cpp's scale searches), `iqgrid.py` (the IQ grid searches), `fields.py` (fp16 fields, K-quant
scales), `eager.py` / `fused.py` (what the eager / torch.compile dequantizers share).

The package itself only loads the block types, which need no torch: GGUF plans and the GGUF header
are built without paying torch's import.
"""

from gemmaquant.numerics.ggml.types import BLOCK, QK_K, GGMLType, ggml_type, row_bytes

__all__ = ["BLOCK", "QK_K", "GGMLType", "ggml_type", "row_bytes"]
