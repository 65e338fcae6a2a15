"""IQ1_S and IQ1_M (`gemmaquant/numerics/ggml/iq1.py`): every block byte-identical to llama.cpp's
`ggml_quantize_chunk` on real demo weights and on random rows with outliers, zero and tiny
sub-blocks and many equal values (the split search sorts them), with an importance matrix (both)
and without (IQ1_M only: llama.cpp requires one for IQ1_S, and so do we); dequantized bit-equal to
the gguf package."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.numerics.ggml.quantize import quantize
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
from tests.numerics.ggml.test_quantize import imatrix

TYPES = [GGMLType.IQ1_S, GGMLType.IQ1_M]
pytestmark = pytest.mark.usefixtures("one_thread")
CASES = imatrix_cases(TYPES)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_random_rows_match_libggml(c_tables, case: tuple[GGMLType, bool]) -> None:
    qtype, with_imatrix = case
    check_random_rows(qtype, with_imatrix, 32)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_demo_tensors_match_libggml(demo_dir, c_tables, case: tuple[GGMLType, bool]) -> None:
    qtype, with_imatrix = case
    check_demo_tensors(demo_dir, qtype, with_imatrix, 64)


def test_iq1_s_refused_without_imatrix() -> None:
    with pytest.raises(GemmaQuantError, match="IQ1_S needs an importance matrix"):
        quantize(torch.randn(2, 256), GGMLType.IQ1_S)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_our_bytes(qtype: GGMLType) -> None:
    w = random_rows(8, 512, seed=3)
    check_dequantize_bytes(qtype, quantize(w, qtype, imatrix(512)), tuple(w.shape))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes(qtype: GGMLType) -> None:
    check_dequantize_random_bytes(qtype)
