"""The registry of GGML type families (`gemmaquant/numerics/ggml/registry.py`): every type of the
enum has its kernels from exactly one family, looked up by enum, number or name, and a type without
kernels is refused in one line naming the supported ones."""

from __future__ import annotations

import pytest

from gemmaquant.errors import GemmaQuantError
from gemmaquant.numerics.ggml import registry
from gemmaquant.numerics.ggml.family import GGMLKernels
from gemmaquant.numerics.ggml.floats import dequantize_f32, quantize_f32
from gemmaquant.numerics.ggml.types import GGMLType


def test_every_type_has_kernels_from_one_family() -> None:
    assert set(registry.TYPES) == set(GGMLType)
    declared = [t for family in registry.FAMILIES for t in family.TYPES]
    assert sorted(declared) == sorted(GGMLType)


@pytest.mark.parametrize("key", [GGMLType.Q6_K, 14, "q6_k", "Q6_K"])
def test_lookup_by_enum_number_or_name(key) -> None:
    assert registry.kernels(key) is registry.TYPES[GGMLType.Q6_K]


def test_a_type_without_kernels_is_one_line_naming_the_supported(monkeypatch) -> None:
    monkeypatch.delitem(registry.TYPES, GGMLType.TQ1_0)
    with pytest.raises(GemmaQuantError) as e:
        registry.kernels("tq1_0")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("GGML type TQ1_0 has no kernels; supported: F32, F16, Q4_0")
    assert "TQ2_0" in msg and "TQ1_0," not in msg


def test_unknown_type_is_refused() -> None:
    with pytest.raises(GemmaQuantError, match="unsupported GGML type 'Q7_K'"):
        registry.kernels("Q7_K")


def test_float_types_take_no_imatrix() -> None:
    with pytest.raises(ValueError, match="float type cannot need an importance matrix"):
        GGMLKernels(quantize_f32, dequantize_f32, is_float=True, needs_imatrix=True)
    assert {t for t, k in registry.TYPES.items() if k.is_float} == {GGMLType.F32, GGMLType.F16, GGMLType.BF16}
