"""IQ2_XXS, IQ2_XS and IQ2_S (`gemmaquant/numerics/ggml/iq2.py`): every block byte-identical to
llama.cpp's `ggml_quantize_chunk` on real demo weights and on random rows with outliers, zero and
tiny sub-blocks, with an importance matrix (all three) and without (IQ2_S only: for the other two
llama.cpp requires one, and so do we); dequantized bit-equal to the gguf package."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.registry import REQUIRES_IMATRIX
from gemmaquant.numerics.ggml.types import GGMLType
from tests.numerics.ggml.family_checks import (
    case_id,
    check_demo_tensors,
    check_dequantize_bytes,
    check_dequantize_random_bytes,
    check_random_rows,
    imatrix_cases,
    random_rows,
)
from tests.numerics.ggml.libggml import requires_imatrix
from tests.numerics.ggml.test_quantize import imatrix

TYPES = [GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S]
pytestmark = pytest.mark.usefixtures("one_thread")
CASES = imatrix_cases(TYPES)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_random_rows_match_libggml(c_tables, case: tuple[GGMLType, bool]) -> None:
    qtype, with_imatrix = case
    check_random_rows(qtype, with_imatrix, 16)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_demo_tensors_match_libggml(demo_dir, c_tables, case: tuple[GGMLType, bool]) -> None:
    qtype, with_imatrix = case
    check_demo_tensors(demo_dir, qtype, with_imatrix, 32)


@pytest.mark.parametrize("qtype", sorted(REQUIRES_IMATRIX), ids=lambda t: t.name)
def test_refused_without_imatrix(qtype: GGMLType) -> None:
    with pytest.raises(GemmaQuantError, match=f"{qtype.name} needs an importance matrix"):
        quantize(torch.randn(2, 256), qtype)


@pytest.mark.slow
def test_requires_imatrix_is_llama_cpps_list() -> None:
    assert {t for t in GGMLType if requires_imatrix(t)} == set(REQUIRES_IMATRIX)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_our_bytes(qtype: GGMLType) -> None:
    w = random_rows(4, 512, seed=3)
    check_dequantize_bytes(qtype, quantize(w, qtype, imatrix(512)), tuple(w.shape))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes(qtype: GGMLType) -> None:
    check_dequantize_random_bytes(qtype)
