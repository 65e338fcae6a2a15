"""calib/spill.py: a tensor parked in a file comes back bit for bit, and leaves no file behind."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.calib.spill import Parked
from gemmaquant.errors import GemmaQuantError


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int16])
def test_round_trip_is_bit_exact_and_the_file_is_unlinked(tmp_path, dtype, monkeypatch):
    monkeypatch.setattr("gemmaquant.calib.spill.CHUNK", 1000)  # several reads and writes, one cut mid-element
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(37, 53, generator=g) * 1e3).to(dtype)
    if dtype.is_floating_point:
        t[0, :4] = torch.tensor([float("inf"), -0.0, float("nan"), 1e-40]).to(dtype)
    p = Parked(t, tmp_path)
    assert list(tmp_path.iterdir()) == []  # an open descriptor keeps it: nothing to clean up after a crash
    for _ in range(2):
        back = p.load()
        assert back.dtype == dtype and back.shape == t.shape
        assert torch.equal(back.view(-1).view(torch.uint8), t.view(-1).view(torch.uint8))
    p.close()
    with pytest.raises(ValueError, match="closed"):
        p.load()


def test_a_directory_it_cannot_write_is_named(tmp_path):
    missing = tmp_path / "gone"
    with pytest.raises(GemmaQuantError, match=f"{missing}: cannot park a 0.00 GB calibration matrix"):
        Parked(torch.zeros(4, 4), missing)
