"""TQ1_0 and TQ2_0: ternary weights, x = d*(c-1) with c in {0, 1, 2} and d the block's largest |x|.

Meant for ternary-trained (BitNet-style) checkpoints; on ordinary weights they lose most of the
information. Quantizers are byte-identical to `ggml_quantize_chunk` (`quantize_row_tq{1,2}_0_ref`,
which ignore any imatrix): the code is `lroundf(x/d) + 1` (ties away from zero) with the float32
`1/d`, and d is stored as fp16. TQ2_0 packs 4 codes per byte; TQ1_0 packs 5 (or 4) base-3 digits
per byte as `ceil(v * 256 / 243)`, so that a digit is recovered by a multiply and a shift.
Dequantizers `(b [nb, bytes] uint8, out [nb, 256] float32)` write gguf-py's `d*(c-1)`.
"""

from __future__ import annotations

import torch

from gemmaquant.numerics.ggml.fields import f16, fp16_bytes
from gemmaquant.numerics.ggml.search import div, roundf
from gemmaquant.numerics.ggml.family import GGMLKernels, per_block
from gemmaquant.numerics.ggml.types import QK_K, GGMLType


def _codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nb, 256] -> (d [nb] float32, codes [nb, 256] int32 in 0..2)."""
    d = x.abs().amax(dim=1)
    iscale = torch.where(d != 0, div(1.0, d), 0.0)
    return d, roundf(x * iscale[:, None]).to(torch.int32) + 1


def quantize_tq2_0(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """[nb, 256] -> [nb, 66]: qs[64] (byte 32c + m holds weights 128c + 32n + m at bits 2n), d."""
    d, q = _codes(x)
    q = (q & 3).view(-1, 2, 4, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return torch.cat([qs.reshape(-1, 64).to(torch.uint8), fp16_bytes(d)], dim=1)


def _base3(q: torch.Tensor) -> torch.Tensor:
    """[nb, k, m] digits -> [nb, m]: the k digits of each column as one base-3 number, first digit
    most significant (C: `q = q*3 + digit` in order)."""
    v = torch.zeros_like(q[:, 0])
    for n in range(q.shape[1]):
        v = v * 3 + q[:, n]
    return v


def quantize_tq1_0(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """[nb, 256] -> [nb, 54]: qs[48] then qh[4] then d. qs[m] (m < 32) holds weights m + 32n,
    qs[32 + m] (m < 16) weights 160 + m + 16n, for n = 0..4; qh[j] holds weights 240 + j + 4n for
    n = 0..3, shifted up one digit."""
    nb = x.shape[0]
    d, q = _codes(x)
    v = torch.cat(
        [
            _base3(q[:, :160].view(nb, 5, 32)),
            _base3(q[:, 160:240].view(nb, 5, 16)),
            _base3(q[:, 240:].view(nb, 4, 4)) * 3,
        ],
        dim=1,
    )
    packed = (v * 256 + (243 - 1)) // 243  # ceiling division: uint16 arithmetic in C, exact here
    return torch.cat([packed.to(torch.uint8), fp16_bytes(d)], dim=1)


def dequantize_tq2_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = b[:, :64].reshape(-1, 2, 1, 32)
    c = (torch.cat([q, q >> 2, q >> 4, q >> 6], dim=2) & 3).reshape(-1, 256).to(torch.int8) - 1
    torch.mul(f16(b, 64), c.float(), out=out)


def dequantize_tq1_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # Digit n of a packed byte is the top byte of (uint8)(byte * 3^n) * 3 (gguf: uint8 multiply,
    # which wraps, then a uint16 multiply and shift).
    nb = b.shape[0]
    bq = b[:, :52].to(torch.int32)

    def digits(field: torch.Tensor, k: int) -> torch.Tensor:
        return torch.stack([(field * 3**n) & 0xFF for n in range(k)], dim=1).reshape(nb, -1)

    q = torch.cat([digits(bq[:, :32], 5), digits(bq[:, 32:48], 5), digits(bq[:, 48:52], 4)], dim=1)
    c = ((q * 3) >> 8) - 1
    torch.mul(f16(b, 52), c.float(), out=out)


TYPES = {
    GGMLType.TQ1_0: GGMLKernels(per_block(quantize_tq1_0, QK_K), dequantize_tq1_0),
    GGMLType.TQ2_0: GGMLKernels(per_block(quantize_tq2_0, QK_K), dequantize_tq2_0),
}
