"""IQ4_NL and IQ4_XS (`gemmaquant/numerics/ggml/iq4.py`): every block byte-identical to llama.cpp's
`ggml_quantize_chunk`, with and without an importance matrix, on real demo weights and on random
rows with outliers, zero and tiny sub-blocks; dequantized bit-equal to the gguf package."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.numerics.ggml.iq4 import best_index, kvalues
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.types import BLOCK, GGMLType
from tests.numerics.ggml.family_checks import (
    DEMO_32,
    DEMO_256,
    check_demo_tensors,
    check_dequantize_bytes,
    check_dequantize_random_bytes,
    check_random_rows,
    random_rows,
)
from tests.numerics.ggml.test_quantize import imatrix

TYPES = [GGMLType.IQ4_NL, GGMLType.IQ4_XS]
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
    check_demo_tensors(demo_dir, qtype, with_imatrix, 64, DEMO_256 + (DEMO_32 if BLOCK[qtype][0] == 32 else []))


def test_best_index_ties_go_up() -> None:
    # best_index_int8: below/above the table clamp to its ends; a value exactly between two levels
    # takes the upper one; otherwise the nearer one.
    kv = kvalues()
    v = torch.tensor([-200.0, -127.0, -115.5, -115.4, -115.6, 0.0, 7.0, 112.9, 113.0, 500.0])
    assert best_index(v, kv).tolist() == [0, 0, 1, 1, 0, 8, 9, 15, 15, 15]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_our_bytes(qtype: GGMLType) -> None:
    w = random_rows(16, 512, seed=3)
    for im in (None, imatrix(512)):
        check_dequantize_bytes(qtype, quantize(w, qtype, im), tuple(w.shape))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes(qtype: GGMLType) -> None:
    check_dequantize_random_bytes(qtype)
