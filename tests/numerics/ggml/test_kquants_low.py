"""Q2_K and Q3_K (`gemmaquant/numerics/ggml/kquants_low.py`): every block byte-identical to llama.cpp's
`ggml_quantize_chunk`, with and without an importance matrix, on real demo weights and on random
rows with outliers, zero and tiny sub-blocks; dequantized bit-equal to the gguf package."""

from __future__ import annotations

import pytest

from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.types import GGMLType
from tests.numerics.ggml.family_checks import (
    check_demo_tensors,
    check_dequantize_bytes,
    check_dequantize_random_bytes,
    check_random_rows,
    random_rows,
)
from tests.numerics.ggml.test_quantize import imatrix

TYPES = [GGMLType.Q2_K, GGMLType.Q3_K]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_rows_match_libggml(qtype: GGMLType, with_imatrix: bool) -> None:
    check_random_rows(qtype, with_imatrix, 64)


@pytest.mark.slow
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_demo_tensors_match_libggml(demo_dir, qtype: GGMLType, with_imatrix: bool) -> None:
    check_demo_tensors(demo_dir, qtype, with_imatrix, 128)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_our_bytes(qtype: GGMLType) -> None:
    w = random_rows(16, 512, seed=3)
    for im in (None, imatrix(512)):
        check_dequantize_bytes(qtype, quantize(w, qtype, im), tuple(w.shape))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes(qtype: GGMLType) -> None:
    check_dequantize_random_bytes(qtype)
