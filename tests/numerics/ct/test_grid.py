"""The calibration grid (numerics/ct/grid.py) is the writers' grid: an all-zero group gets the one
zero-scale rule (scale eps, every code dequantizing to exactly 0) in both, symmetric or not."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.numerics.ct.grid import rtn
from gemmaquant.numerics.ct.quantize import quantize_pack


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_an_all_zero_group_keeps_the_writers_rule(bits, symmetric):
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w[1, :128] = 0  # one all-zero group
    got = rtn(w, bits, 128, symmetric)
    ref = quantize_pack(w.float(), bits, group_size=128, symmetric=symmetric)  # the writers compute in float32
    assert torch.equal(got.scale, ref.weight_scale)
    assert got.scale[1, 0].item() == torch.tensor(torch.finfo(torch.float32).eps).to(torch.bfloat16).item()
    assert torch.equal(got.dequantize()[1, :128], torch.zeros(128))
