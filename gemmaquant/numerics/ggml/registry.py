"""Every GGML type gemmaquant quantizes or reads, assembled from the type family modules.

`kernels(qtype)` is how `quantize()`, `dequantize()` and the compiled path find a type's
quantizer, dequantizers and flags (`family.GGMLKernels`); each family module declares its types
once, in its `TYPES`. A type listed in `types.GGMLType` but in no family is refused with the
supported ones named.
"""

from __future__ import annotations

from gemmaquant.errors import GemmaQuantError
from gemmaquant.numerics.ggml import floats, iq1, iq2, iq3, iq4, kquants, kquants_low, legacy, ternary
from gemmaquant.numerics.ggml.family import GGMLKernels
from gemmaquant.numerics.ggml.types import GGMLType, ggml_type

FAMILIES = (floats, legacy, kquants, kquants_low, iq4, iq3, iq2, iq1, ternary)


def _assemble() -> dict[GGMLType, GGMLKernels]:
    table: dict[GGMLType, GGMLKernels] = {}
    for family in FAMILIES:
        for qtype, k in family.TYPES.items():
            if qtype in table:
                raise RuntimeError(f"{qtype.name} is declared by two type families")
            table[qtype] = k
    return dict(sorted(table.items()))


TYPES: dict[GGMLType, GGMLKernels] = _assemble()

# Types whose llama.cpp quantizer cannot run without an importance matrix (ggml asserts;
# `ggml_quantize_requires_imatrix`).
REQUIRES_IMATRIX = frozenset(t for t, k in TYPES.items() if k.needs_imatrix)


def kernels(qtype: GGMLType | int | str) -> GGMLKernels:
    """The kernels of a type (by enum, number or name), or one error naming the supported types."""
    qtype = ggml_type(qtype)
    try:
        return TYPES[qtype]
    except KeyError:
        allowed = ", ".join(t.name for t in TYPES)
        raise GemmaQuantError(f"GGML type {qtype.name} has no kernels; supported: {allowed}") from None
