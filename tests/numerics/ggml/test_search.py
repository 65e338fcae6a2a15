"""The sequential float32 sums of the scale searches against a plain left-to-right float32 loop in
numpy (ggml's `for (i...) sum += t[i]` starting at 0.0f): `seq_sum` uses torch's `index_add_`
for speed, whose row order is an ATen implementation detail this pins down."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemmaquant.numerics.ggml.search import seq_sum


def c_order_sum(terms: np.ndarray, start_at_zero: bool) -> np.ndarray:
    acc = np.float32(0.0) + terms[0] if start_at_zero else terms[0].copy()
    for row in terms[1:]:
        acc = acc + row  # float32 + float32: one IEEE rounding per step, as in C
    return acc


@pytest.mark.parametrize("start_at_zero", [True, False])
@pytest.mark.parametrize("p", [8, 16, 32])
def test_seq_sum_is_left_to_right(p: int, start_at_zero: bool) -> None:
    g = torch.Generator().manual_seed(p)
    # Magnitudes spread over 2^-20..2^20 so that any other order (pairwise, vectorized lanes,
    # double accumulation) rounds differently for many columns; -0.0 leads some columns.
    terms = torch.randn(2, p, 4096, generator=g) * torch.exp2(torch.randint(-20, 21, (2, p, 4096), generator=g))
    terms[:, 0, :64] = -0.0
    terms[:, :, 64:96] = -0.0
    ref = np.stack([c_order_sum(t, start_at_zero) for t in terms.numpy()])
    ours = seq_sum(terms, start_at_zero).numpy()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    # The test can fail: the same rows summed in another order (here reversed) or in double
    # precision give other float32 bits for many columns.
    backwards = np.stack([c_order_sum(t[::-1], start_at_zero) for t in terms.numpy()])
    assert (backwards.view(np.uint32) != ref.view(np.uint32)).mean() > 0.1
    exact = terms.double().sum(dim=1).float().numpy()
    assert (exact.view(np.uint32) != ref.view(np.uint32)).mean() > 0.1
    # 2-D input, as the searches call it.
    assert np.array_equal(seq_sum(terms[0], start_at_zero).numpy().view(np.uint32), ref[0].view(np.uint32))


@pytest.mark.subprocess  # compiles C++ (seconds; inductor caches it)
@pytest.mark.parametrize("start_at_zero", [True, False])
def test_compiled_seq_sum_is_left_to_right(start_at_zero: bool) -> None:
    """seq_sum inside torch.compile (the compiled quantizers' path, `_compiled_seq_sum`): the same
    bits as C's loop, including the columns whose terms are all -0.0 (C: -0.0 from t0, +0.0 from
    0.0f), all +0.0, and mixed signed zeros."""
    from gemmaquant.numerics.ggml import compiled_quantize  # noqa: PLC0415 - pins inductor's float flags

    g = torch.Generator().manual_seed(3)
    terms = torch.randn(32, 4096, generator=g) * torch.exp2(torch.randint(-20, 21, (32, 4096), generator=g))
    terms[:, :64] = -0.0
    terms[:, 64:96] = 0.0
    terms[:5, 96:128] = 0.0
    terms[5:, 96:128] = -0.0
    terms[0, 128:160], terms[1, 128:160], terms[2:, 128:160] = 1.0, -1.0, -0.0
    fn = torch.compile(lambda t: seq_sum(t, start_at_zero), fullgraph=True, options=compiled_quantize.OPTIONS)
    ref = c_order_sum(terms.numpy(), start_at_zero)
    assert np.array_equal(fn(terms).numpy().view(np.uint32), ref.view(np.uint32))
    assert np.signbit(ref[:64]).all() != start_at_zero  # the -0.0 columns are in the test
