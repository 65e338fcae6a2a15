"""The GGML type table (`gemmaquant/numerics/ggml/types.py`) against the gguf package's: block geometry of
every type, and the fp16 scale fields that integrity checks read."""

from __future__ import annotations

import numpy as np
import pytest

from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.types import BLOCK, F16_FIELDS, GGMLType
from tests.numerics.ggml.test_quantize import imatrix, synthetic

gguf = pytest.importorskip("gguf")
QUANTIZED = [t for t in GGMLType if t not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16)]


@pytest.mark.parametrize("qtype", list(GGMLType), ids=lambda t: t.name)
def test_block_geometry_is_gguf_s(qtype: GGMLType) -> None:
    assert BLOCK[qtype] == gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(qtype))]


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_f16_fields_are_the_scales(qtype: GGMLType) -> None:
    # A NaN written into a listed field makes gguf dequantize the block to NaNs: it is a scale.
    n = BLOCK[qtype][0] if BLOCK[qtype][0] == 256 else 256
    block = quantize(synthetic(12, n, seed=1)[-1:], qtype, imatrix(n)).numpy()[:, : BLOCK[qtype][1]]
    for offset in F16_FIELDS[qtype]:
        bad = block.copy()
        bad[0, offset : offset + 2] = np.frombuffer(np.float16(np.nan).tobytes(), dtype=np.uint8)
        with np.errstate(invalid="ignore"):
            values = gguf.quants.dequantize(bad, gguf.GGMLQuantizationType(int(qtype)))
        assert np.isnan(values).any(), (qtype.name, offset)
    assert F16_FIELDS[qtype] or qtype == GGMLType.IQ1_M  # only IQ1_M splits its scale

