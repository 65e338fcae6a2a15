"""Q2_K and Q3_K (`gemmaquant/numerics/ggml/kquants_low.py`): every block byte-identical to llama.cpp's
`ggml_quantize_chunk`, with and without an importance matrix, on real demo weights and on random
rows with outliers, zero and tiny sub-blocks; dequantized bit-equal to the gguf package."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.types import GGMLType
from tests.numerics.ggml.family_checks import (
    DEMO_256,
    check_against_libggml,
    check_dequantize_bytes,
    check_dequantize_random_bytes,
    demo_rows,
    random_rows,
)
from tests.numerics.ggml.test_quantize import imatrix

TYPES = [GGMLType.Q2_K, GGMLType.Q3_K]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # results never depend on it; a loaded 2-core box runs faster so
    yield
    torch.set_num_threads(old)


@pytest.mark.slow
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_rows_match_libggml(qtype: GGMLType, with_imatrix: bool) -> None:
    for seed, n in ((0, 1024), (1, 256)):
        w = random_rows(64, n, seed=seed)
        check_against_libggml(qtype, w, imatrix(n, seed=seed + 7) if with_imatrix else None)


@pytest.mark.slow
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_demo_tensors_match_libggml(demo_dir, qtype: GGMLType, with_imatrix: bool) -> None:
    for name in DEMO_256:
        w = demo_rows(demo_dir, name, 128)
        check_against_libggml(qtype, w, imatrix(w.shape[1]) if with_imatrix else None)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_our_bytes(qtype: GGMLType) -> None:
    w = random_rows(16, 512, seed=3)
    for im in (None, imatrix(512)):
        check_dequantize_bytes(qtype, quantize(w, qtype, im), tuple(w.shape))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes(qtype: GGMLType) -> None:
    check_dequantize_random_bytes(qtype)
