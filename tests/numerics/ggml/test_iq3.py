"""IQ3_XXS and IQ3_S (`gemmaquant/numerics/ggml/iq3.py`): every block byte-identical to llama.cpp's
`ggml_quantize_chunk`, with and without an importance matrix, on real demo weights and on random
rows with outliers, zero and tiny sub-blocks (IQ3_S's shifted write pointers after an exactly-zero
sub-block included); dequantized bit-equal to the gguf package."""

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
from tests.numerics.ggml.libggml import ggml_quantize, require_libggml
from tests.numerics.ggml.test_quantize import imatrix

TYPES = [GGMLType.IQ3_XXS, GGMLType.IQ3_S]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_rows_match_libggml(c_tables, qtype: GGMLType, with_imatrix: bool) -> None:
    check_random_rows(qtype, with_imatrix, 32)


@pytest.mark.slow
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_demo_tensors_match_libggml(demo_dir, c_tables, qtype: GGMLType, with_imatrix: bool) -> None:
    check_demo_tensors(demo_dir, qtype, with_imatrix, 32)


@pytest.mark.slow
def test_iq3_s_zero_sub_block_shifts_later_ones(c_tables) -> None:
    # The second 32-weight sub-block is exactly zero: ggml writes sub-blocks 2..7's grid indices
    # and signs one slot early and leaves the last slot 0. Our bytes follow, and so does gguf's
    # (and llama.cpp's) misreading of them.
    require_libggml()
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(4)) * 0.02
    w[:, 32:64] = 0.0
    ours = quantize(w, GGMLType.IQ3_S)
    assert torch.equal(ours, ggml_quantize(w, GGMLType.IQ3_S))
    assert (ours[:, 2 + 56 : 2 + 64] == 0).all() and (ours[:, 74 + 28 : 74 + 32] == 0).all()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_our_bytes(qtype: GGMLType) -> None:
    w = random_rows(8, 512, seed=3)
    for im in (None, imatrix(512)):
        check_dequantize_bytes(qtype, quantize(w, qtype, im), tuple(w.shape))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes(qtype: GGMLType) -> None:
    check_dequantize_random_bytes(qtype)
