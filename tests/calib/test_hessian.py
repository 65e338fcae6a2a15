"""The Hessian helpers both GPTQs use (calib/hessian.py): the damped inverse's Cholesky factor, by the
float64 steps (narrow inputs) and in place in float32 (wide ones), and the quadratic forms.

References: torch.linalg in float64 (the factor of the explicitly inverted damped matrix) and the
quadratic forms computed from X itself."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.calib import hessian
from gemmaquant.errors import GemmaQuantError


def _inputs(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Correlated channels with a few large ones, like a Linear's input (and one channel never seen)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n // 8, generator=g) @ torch.randn(n // 8, n, generator=g)
    x = x + 0.3 * torch.randn(tokens, n, generator=g)
    x[:, :: max(1, n // 7)] *= 20.0
    x[:, 5] = 0.0
    return x


def _reference(H: torch.Tensor, damp: float, perm: torch.Tensor) -> torch.Tensor:
    """chol((H_p + λI)⁻¹) upper, the inverse formed explicitly, in float64."""
    Hp = H.double()[perm][:, perm]
    d = Hp.diagonal()
    d.copy_(torch.where(d == 0, torch.ones_like(d), d))
    Hd = Hp + damp * d.mean() * torch.eye(len(d), dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)


@pytest.fixture(params=[(300, 64), (301, 64), (256, 128)], ids=["panels-64", "odd-n", "panels-128"])
def wide(request, monkeypatch):
    """A shape whose factor takes the in-place float32 path, over several panels (and an odd n)."""
    n, panel = request.param
    monkeypatch.setattr(hessian, "WIDE", 100)
    monkeypatch.setattr(hessian, "PANEL", panel)
    return n


@pytest.mark.parametrize("damp", [0.01, 0.3])
def test_wide_factor_in_float32_equals_the_float64_reference(wide, damp):
    n = wide
    X = _inputs(n, 2 * n)
    H = X.T @ X
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    U = hessian.inverse_cholesky(H, damp, perm)
    ref = _reference(H, damp, perm)
    assert U.dtype == torch.float32 and U.shape == (n, n)
    assert torch.equal(U, U.triu())
    assert float((U.double() - ref).abs().max() / ref.abs().max()) < 2e-5
    # and what GPTQ uses it for: (UᵀU)(H_p + λI) = I
    Hp = H.double()[perm][:, perm]
    d = Hp.diagonal()
    d.copy_(torch.where(d == 0, torch.ones_like(d), d))
    Hd = Hp + damp * d.mean() * torch.eye(n, dtype=torch.float64)
    eye = U.double().T @ U.double() @ Hd
    assert float((eye - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-3


def test_narrow_factor_is_the_float64_one():
    n = 96
    X = _inputs(n, 400)
    H = X.T @ X
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    U = hessian.inverse_cholesky(H, 0.3, perm)
    ref = _reference(H, 0.3, perm)
    assert float((U.double() - ref).abs().max() / ref.abs().max()) < 1e-6


def test_damping_is_raised_until_the_factor_exists_and_then_gives_up(monkeypatch):
    monkeypatch.setattr(hessian, "PANEL", 64)
    n = 150
    X = _inputs(n, 40)  # rank 40 of 150
    H = X.T @ X
    H[7, 7] *= 1e-3  # indefinite: channel 7 correlates with others beyond its own variance
    assert float(torch.linalg.eigvalsh(H.double() + 0.01 * H.diagonal().double().mean() * torch.eye(n)).min()) < 0
    perm = torch.arange(n)
    got = {}
    for path, wide in (("narrow", 4096), ("wide", 100)):
        monkeypatch.setattr(hessian, "WIDE", wide)
        got[path] = hessian.inverse_cholesky(H, 0.01, perm).double()
    # both raised the damping to the same first value that works: 0.1 or above
    for damp in (0.1, 1.0, 10.0, 100.0, 1000.0):
        try:
            ref = _reference(H, damp, perm)
        except torch.linalg.LinAlgError:
            continue
        if torch.isfinite(ref).all():
            break
    assert float((got["narrow"] - ref).abs().max() / ref.abs().max()) < 1e-6
    assert float((got["wide"] - ref).abs().max() / ref.abs().max()) < 2e-5
    for wide in (4096, 100):
        monkeypatch.setattr(hessian, "WIDE", wide)
        with pytest.raises(GemmaQuantError, match="not positive definite even with damping"):
            hessian.inverse_cholesky(-torch.eye(n) * 5, 0.01, perm)


def test_wide_gptq_codes_match_the_float64_ones(wide):
    """The whole error-feedback rounding of a GGML type with the float32 factor: the same layer loss as
    with the float64 one, to float32 rounding, and the same codes but for near ties."""
    from gemmaquant.calib.ggml_gptq import hessian_factor, optimize_tensor
    from gemmaquant.numerics.ggml.types import GGMLType

    n = (wide // 32) * 32
    X = _inputs(n, 3 * n)
    H = X.T @ X
    W = (torch.randn(24, n, generator=torch.Generator().manual_seed(5)) * 0.02).bfloat16().float()
    imat = (X.double() ** 2).mean(0)
    f32 = hessian_factor(H, damp=0.3)
    got = optimize_tensor(W, H, GGMLType.Q4_0, imat, factor=f32)
    hessian.WIDE = 4096  # the float64 steps (the fixture's monkeypatch restores it)
    f64 = hessian_factor(H, damp=0.3)
    assert torch.equal(f32.perm, f64.perm)
    ref = optimize_tensor(W, H, GGMLType.Q4_0, imat, factor=f64)
    assert got.loss == pytest.approx(ref.loss, rel=1e-3)
    assert got.loss < got.loss_llama
    assert float((got.data != ref.data).float().mean()) < 0.01


@pytest.mark.parametrize("n", [96, 300])
def test_quadratic_forms_against_x(n, monkeypatch):
    monkeypatch.setattr(hessian, "WIDE", 100)
    monkeypatch.setattr(hessian, "BLOCK", 64 * n)  # 64 columns at a time on the wide path
    X = _inputs(n, 2 * n).double()
    H = (X.T @ X).float()
    D = torch.randn(7, n, dtype=torch.float64) * 0.01
    want = ((X @ D.T) ** 2).sum(0)
    assert torch.allclose(hessian.row_losses(D, H), want, rtol=1e-5)
    assert hessian.quad_form(D, H) == pytest.approx(float(want.sum()), rel=1e-5)
    got, want = hessian.matmul_h(D, H), D @ H.double()
    if n <= hessian.WIDE:  # float64 products
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
    else:  # float32 products on column blocks
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_wide_products_do_not_depend_on_the_thread_count(monkeypatch):
    """MKL sums a long, thin float32 product differently on 1 and 2 threads (this shape differs by
    itself); the wide path runs them on one thread, so losses, refits and budget plans do not depend on
    --threads, and the caller's thread count is restored."""
    monkeypatch.setattr(hessian, "WIDE", 512)
    n = 1024
    g = torch.Generator().manual_seed(11)
    X = torch.randn(n, n, generator=g)
    H = X.T @ X
    D = torch.randn(64, n, generator=g) * 0.01
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append((hessian.row_losses(D, H), hessian.matmul_h(D, H)))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0][0], got[1][0])
    assert torch.equal(got[0][1], got[1][1])
