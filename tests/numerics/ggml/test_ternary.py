"""TQ1_0 and TQ2_0 (`gemmaquant/numerics/ggml/ternary.py`): every block byte-identical to llama.cpp's
`ggml_quantize_chunk` (which ignores an importance matrix for them, and so do we), on real demo
weights, on random rows and on exact ±d/2 ties; dequantized bit-equal to the gguf package."""

from __future__ import annotations

import pytest
import torch

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

TYPES = [GGMLType.TQ1_0, GGMLType.TQ2_0]


def ties(n: int) -> torch.Tensor:
    """Rows of exact halves of the block maximum: lroundf rounds them away from zero; one value
    a float32 step below a half must round toward zero."""
    row = (torch.arange(n) % 3 - 1) * 0.5
    row[0] = 1.0
    below = row * 0.37
    below[5] = 0.37 * float(torch.tensor(0.5).nextafter(torch.tensor(0.0)))
    return torch.stack([row, -row, below, row * 1e-30])


@pytest.mark.slow
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_rows_match_libggml(qtype: GGMLType, with_imatrix: bool) -> None:
    check_random_rows(qtype, with_imatrix, 64, extra=ties)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_demo_tensors_match_libggml(demo_dir, qtype: GGMLType) -> None:
    check_demo_tensors(demo_dir, qtype, False, 256)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_imatrix_is_ignored(qtype: GGMLType) -> None:
    w = random_rows(8, 512, seed=2)
    assert torch.equal(quantize(w, qtype, imatrix(512)), quantize(w, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_our_bytes(qtype: GGMLType) -> None:
    w = torch.cat([random_rows(16, 512, seed=3), ties(512)])
    check_dequantize_bytes(qtype, quantize(w, qtype), tuple(w.shape))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes(qtype: GGMLType) -> None:
    check_dequantize_random_bytes(qtype)
