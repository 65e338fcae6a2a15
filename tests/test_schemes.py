"""The registry refuses a scheme that could not work, at import rather than mid-quantization, and its
algorithm names are one list shared by the CLI, recipes and calibration."""

from __future__ import annotations

import pytest

from gemmaquant.numerics.ct.formats import FORMATS
from gemmaquant.schemes import ALGORITHMS, CT_FORMATS, SCHEMES, CTScheme, GGUFScheme, QuantArgs

W8 = QuantArgs(8, "int", "channel")


@pytest.mark.parametrize("kw, match", [
    (dict(ct_format="nf4-quantized", weights=W8), "compressed-tensors format 'nf4-quantized'"),
    (dict(ct_format="float-quantized", weights=W8), "float-quantized needs float weights"),
    (dict(ct_format="pack-quantized", weights=W8, input_activations=QuantArgs(8, "int", "token", dynamic=True)),
     "pack-quantized is weight-only"),
    (dict(ct_format="pack-quantized", weights=None), "needs int weights"),
    (dict(ct_format="pack-quantized", weights=W8, algorithms=("gptq", "magic")), "unknown base algorithm"),
    (dict(ct_format="pack-quantized", weights=W8, algorithms=("awq+gptq",)), "unknown base algorithm"),
    (dict(ct_format="pack-quantized", weights=W8, algorithms=()), "names its algorithms"),
])
def test_a_broken_compressed_tensors_scheme_is_refused(kw, match):
    kw = {"algorithms": ("rtn",), **kw}
    with pytest.raises(ValueError, match=match):
        CTScheme("x", "summary", "engine", "X", **kw)


def test_a_broken_gguf_preset_is_refused():
    with pytest.raises(ValueError, match="takes rtn or gptq only"):
        GGUFScheme("x", "s", "e", "X", algorithms=("awq",), ftype=7, default_type="Q8_0")
    with pytest.raises(ValueError, match="not quantized"):
        GGUFScheme("x", "s", "e", "X", algorithms=("rtn", "gptq"), ftype=32, default_type="BF16")
    with pytest.raises(ValueError, match="file type"):
        GGUFScheme("x", "s", "e", "X")


def test_every_format_the_registry_names_has_its_behaviour():
    assert set(CT_FORMATS) == set(FORMATS)
    for s in SCHEMES.values():
        if not s.is_gguf:
            assert s.ct_format in FORMATS
            assert set(s.allowed_algorithms) <= set(ALGORITHMS)
        else:
            assert s.weights is None and s.ct_format is None
            assert s.allowed_algorithms == (() if s.default_type in ("BF16", "F16") else ("rtn", "gptq"))
            assert not s.needs_calibration  # gptq is asked for, never the default


def test_combined_algorithms_follow_their_parts():
    assert SCHEMES["int8"].allowed_algorithms == ("smoothquant", "rtn", "smoothquant+gptq")
    assert SCHEMES["w4a16"].allowed_algorithms == ("gptq", "awq", "rtn", "awq+gptq")
    assert SCHEMES["fp8"].allowed_algorithms == ("rtn",)


def test_the_summary_has_a_line_for_every_algorithm():
    """The one tuple of names: the summary's algorithm lines are keyed by exactly schemes.ALGORITHMS."""
    from gemmaquant.pipeline import ALGORITHM_NOTES

    assert tuple(ALGORITHM_NOTES) == ALGORITHMS
