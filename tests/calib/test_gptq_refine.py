"""Clip search, scale refit and the float target, each against an independent float64 formulation."""

from __future__ import annotations

import torch

from gemmaquant.calib.gptq import gptq_quantize, refit_scales
from gemmaquant.numerics.ct.grid import minmax_qparams, rtn, search_qparams
from gemmaquant.calib.pipeline import float_target_weight

from .test_gptq import _correlated_inputs


def _brute_best_scale(w: torch.Tensor, imp: torch.Tensor) -> float:
    """Exhaustive search over every bf16 scale in [absmax/16, absmax/7.5] for ONE symmetric 4-bit group."""
    hi = torch.tensor(w.abs().max().item() / 7.5, dtype=torch.bfloat16)
    cands = torch.arange(hi.view(torch.int16).item() - 160, hi.view(torch.int16).item() + 1, dtype=torch.int16)
    best = float("inf")
    for s in cands.view(torch.bfloat16).double():
        d = w.double() - torch.clamp(torch.round(w.double() / s), -8, 7) * s
        best = min(best, (imp.double() * d * d).sum().item())
    return best


def test_clip_search_beats_minmax_and_nears_the_exhaustive_optimum():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w[:, 0] *= 4  # one outlier per group, the case clipping is for
    imp = torch.rand(64, 128, generator=g) + 0.1
    s0, _ = minmax_qparams(w, 4, True)
    s, z = search_qparams(w, 4, True, importance=imp, max_shrink=0.5)
    assert z is None and s.dtype == torch.float32 and torch.equal(s, s.to(torch.bfloat16).float())

    def err(sc):
        d = w - torch.clamp(torch.round(w / sc[:, None]), -8, 7) * sc[:, None]
        return (imp * d * d).sum(1)

    e0, e = err(s0), err(s)
    assert torch.all(e <= e0) and e.mean() < 0.8 * e0.mean()
    brute = torch.tensor([_brute_best_scale(w[r], imp[r]) for r in range(8)])
    assert torch.all(e[:8].double() <= 1.1 * brute)  # a 2.5%-step grid lands close to the true optimum


def test_rtn_mse_lowers_weight_error_asymmetric_too():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    for sym in (True, False):
        e0 = (rtn(w, 4, 128, sym).dequantize() - w).pow(2).view(32, 2, 128).sum(-1)
        e1 = (rtn(w, 4, 128, sym, mse=True).dequantize() - w).pow(2).view(32, 2, 128).sum(-1)
        assert torch.all(e1 <= e0) and e1.sum() < 0.97 * e0.sum()  # per group never worse


def test_refit_equals_least_squares_on_the_inputs():
    """Refit scales = per-row lstsq on X (not on H), rounded to bf16; the loss never goes up."""
    X = _correlated_inputs(1024, 128, seed=2).double()
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    H = X.T @ X
    q = gptq_quantize(W, H, bits=4, group_size=32, symmetric=True, act_order=False)
    r = refit_scales(W, H, q)
    assert torch.equal(r.codes, q.codes) and r.scale.dtype == torch.bfloat16
    c = q.codes.double()
    for row in range(16):
        B = torch.zeros(128, 4, dtype=torch.float64)
        for g in range(4):
            B[g * 32:(g + 1) * 32, g] = c[row, g * 32:(g + 1) * 32]
        s_ref = torch.linalg.lstsq(X @ B, X @ W[row].double()).solution
        torch.testing.assert_close(r.scale[row].double(), s_ref.to(torch.bfloat16).double(), rtol=8e-3, atol=0)

    def loss(wq):
        return (X @ (W.double() - wq.double()).T).pow(2).sum().item()
    assert loss(r.dequantize()) < loss(q.dequantize())


def test_float_target_is_the_least_squares_fit_of_the_float_outputs():
    g = torch.Generator().manual_seed(4)
    F = _correlated_inputs(2048, 64, seed=5)
    X = F + 0.2 * torch.randn(F.shape, generator=g) * F.std(0)  # the inputs after earlier quantized layers
    W = torch.randn(24, 64, generator=g) * 0.05
    Wt = float_target_weight(W, X.T @ X, F.T @ X, damp=0.0)
    ref = torch.linalg.lstsq(X.double(), (F @ W.T).double()).solution.T
    torch.testing.assert_close(Wt.double(), ref, rtol=1e-3, atol=1e-5)

    def err(wq):  # what the quantized model computes vs what the float model computed
        return (X @ wq.T - F @ W.T).norm().item()
    plain = gptq_quantize(W, X.T @ X, bits=4, group_size=32, symmetric=True).dequantize()
    target = gptq_quantize(Wt, X.T @ X, bits=4, group_size=32, symmetric=True).dequantize()
    assert err(target) < 0.8 * err(plain)
