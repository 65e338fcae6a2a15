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
    DEMO_256,
    check_against_libggml,
    check_dequantize_bytes,
    check_dequantize_random_bytes,
    demo_rows,
    random_rows,
)
from tests.numerics.ggml.libggml import ggml_quantize_init, requires_imatrix
from tests.numerics.ggml.test_quantize import imatrix

TYPES = [GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S]
CASES = [(t, im) for t in TYPES for im in (False, True) if im or t not in REQUIRES_IMATRIX]


def case_id(case: tuple[GGMLType, bool]) -> str:
    return f"{case[0].name}-{'imatrix' if case[1] else 'ref'}"


@pytest.fixture(scope="module")
def c_tables() -> None:
    """llama.cpp builds its grid tables on first use (seconds; IQ1's ~15-40 s on this machine):
    once per module, as setup, not inside the first test."""
    for qtype in TYPES:
        ggml_quantize_init(qtype)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # results never depend on it; a loaded 2-core box runs faster so
    yield
    torch.set_num_threads(old)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_random_rows_match_libggml(c_tables, case: tuple[GGMLType, bool]) -> None:
    qtype, with_imatrix = case
    for seed, n in ((0, 1024), (1, 256)):
        w = random_rows(16, n, seed=seed)
        check_against_libggml(qtype, w, imatrix(n, seed=seed + 7) if with_imatrix else None)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_demo_tensors_match_libggml(demo_dir, c_tables, case: tuple[GGMLType, bool]) -> None:
    qtype, with_imatrix = case
    for name in DEMO_256:
        w = demo_rows(demo_dir, name, 32)
        check_against_libggml(qtype, w, imatrix(w.shape[1]) if with_imatrix else None)


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
