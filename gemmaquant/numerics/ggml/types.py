"""GGML tensor types we read and write, and their block geometry (`ggml/src/ggml-common.h`).

A quantized row of `n` weights is `n / block` consecutive blocks of `bytes` bytes each; rows are
consecutive. Only the types gemmaquant produces or reads back are listed.
"""

from __future__ import annotations

from enum import IntEnum

from gemmaquant.errors import GemmaQuantError

QK_K = 256  # super-block size of the K-quants


class GGMLType(IntEnum):
    """`enum ggml_type` values, as stored in a GGUF tensor info."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35


# type -> (weights per block, bytes per block). Sums follow the field order of the C structs.
BLOCK: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),  # d f16, qs[16]
    GGMLType.Q4_1: (32, 2 + 2 + 16),  # d, m, qs[16]
    GGMLType.Q5_0: (32, 2 + 4 + 16),  # d, qh u32, qs[16]
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),  # d, m, qh u32, qs[16]
    GGMLType.Q8_0: (32, 2 + 32),  # d, qs int8[32]
    GGMLType.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),  # scales[16], qs[64], d, dmin
    GGMLType.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),  # hmask[32], qs[64], scales[12], d
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),  # d, dmin, scales[12], qs[128]
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),  # d, dmin, scales, qh[32], qs[128]
    GGMLType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # ql[128], qh[64], scales[16], d
    GGMLType.IQ4_NL: (32, 2 + 16),  # d, qs[16]
    GGMLType.IQ4_XS: (QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),  # d, scales_h u16, scales_l[4], qs[128]
    GGMLType.IQ1_S: (QK_K, 2 + QK_K // 8 + QK_K // 16),  # d, qs[32], qh u16[8]
    GGMLType.IQ1_M: (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),  # qs[32], qh[16], scales[8] (d inside)
    GGMLType.IQ2_XXS: (QK_K, 2 + QK_K // 4),  # d, qs u16[32]: per 32 weights 4 grid bytes + signs/scale
    GGMLType.IQ2_XS: (QK_K, 2 + QK_K // 4 + QK_K // 32),  # d, qs u16[32], scales[8]
    GGMLType.IQ2_S: (QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 32),  # d, qs[64] (indices, signs), qh[8], scales[8]
    GGMLType.IQ3_XXS: (QK_K, 2 + 3 * QK_K // 8),  # d, qs[96]: grid indices[64], 8 u32 signs + scale
    GGMLType.IQ3_S: (QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 8 + QK_K // 64),  # d, qs[64], qh[8], signs[32], scales[4]
    GGMLType.TQ1_0: (QK_K, (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64 + 2),  # qs[48], qh[4], d
    GGMLType.TQ2_0: (QK_K, QK_K // 4 + 2),  # qs[64], d
}


# Byte offsets of the fp16 scale fields (d, dmin) in a block, for integrity checks of a file's
# scales. IQ1_M has none: its fp16 scale is split over the top nibbles of its 4 scale words.
F16_FIELDS: dict[GGMLType, tuple[int, ...]] = {
    **{t: (0,) for t in (GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.IQ4_NL, GGMLType.IQ4_XS,
                         GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S,
                         GGMLType.IQ1_S)},
    **{t: (0, 2) for t in (GGMLType.Q4_1, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K)},
    GGMLType.Q6_K: (208,),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.TQ1_0: (52,),
    GGMLType.TQ2_0: (64,),
    GGMLType.IQ1_M: (),
}


def ggml_type(value: int | str | GGMLType) -> GGMLType:
    """Look a type up by number or name ("Q6_K", "q6_k"), with an error listing the supported ones."""
    try:
        if isinstance(value, str):
            return GGMLType[value.upper()]
        return GGMLType(value)
    except (KeyError, ValueError):
        allowed = ", ".join(f"{t.name} ({int(t)})" for t in GGMLType)
        raise GemmaQuantError(f"unsupported GGML type {value!r}; supported: {allowed}") from None


def row_bytes(qtype: GGMLType, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` weights; the row must be a whole number of blocks."""
    qtype = ggml_type(qtype)
    block, nbytes = BLOCK[qtype]
    if n_per_row <= 0 or n_per_row % block != 0:
        raise GemmaQuantError(
            f"row size {n_per_row} is not a positive multiple of the {qtype.name} block of {block}"
        )
    return n_per_row // block * nbytes
