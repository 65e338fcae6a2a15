"""Error-feedback rounding in the GGML grids (calib/ggml_gptq.py, ggml_gptq_grid.py, ggml_codes.py).

References: our byte-identical llama.cpp quantizer (`ggml.quantize`, itself tested against libggml),
libggml directly (slow tier), gguf-py's dequantizer, and the layer loss ||X(W − Ŵ)ᵀ||² computed from X.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemmaquant.calib.ggml_codes import SCALAR_TYPES, pack_codes, sub_grid, unpack_codes
from gemmaquant.calib.ggml_gptq import (
    gptq_codes, hessian_factor, layer_loss, llama_rounding, optimize_tensor,
)
from gemmaquant.calib.ggml_gptq_grid import llama_grid_rounding, optimize_grid_tensor
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.types import GGMLType

T = GGMLType
ROWS, N = 16, 512
# Q4_1/Q5_1 with an imatrix round against a (scale, min) internal to llama.cpp's search that the
# block does not store: there we take the nearest stored value instead (never worse per weight).
INEXACT = {T.Q4_1, T.Q5_1}


def _weights(seed: int = 0, rows: int = ROWS, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * 0.02
    w[:, 7] *= 12.0  # an outlier column
    w[3, 32:64] = 0.0  # an all-zero 32-weight sub-block
    return w.bfloat16().float()


def _inputs(seed: int = 1, tokens: int = 1500, n: int = N) -> torch.Tensor:
    """Correlated channels with a few large ones, like a transformer's Linear inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n // 8, generator=g) @ torch.randn(n // 8, n, generator=g)
    x = x + 0.3 * torch.randn(tokens, n, generator=g)
    x[:, :4] *= 6.0
    return x


@pytest.fixture(scope="module")
def data():
    W = _weights()
    X = _inputs()
    H = X.T @ X
    imatrix = (X * X).mean(0)
    return W, X, H, imatrix


@pytest.mark.parametrize("qtype", SCALAR_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("with_imatrix", [True, False], ids=["imatrix", "ref"])
def test_codes_and_grid_round_trip_llama_bytes(data, qtype, with_imatrix, monkeypatch):
    """Unpacking and repacking llama.cpp's bytes is the identity, and code × grid is the dequantizer;
    also with the codes as int16 (as error feedback keeps them), decoded a few rows and packed a few
    blocks at a time."""
    from gguf.quants import dequantize as gguf_dequantize

    from gemmaquant.calib import ggml_codes

    W, _, _, imatrix = data
    b = quantize(W, qtype, imatrix if with_imatrix else None)
    codes = unpack_codes(b, qtype, ROWS)
    assert torch.equal(pack_codes(b, qtype, codes), b)
    ref = gguf_dequantize(b.numpy(), int(qtype)).reshape(ROWS, N)
    for c in (codes, codes.to(torch.int16)):
        np.testing.assert_array_equal(sub_grid(b, qtype, ROWS).values(c).numpy(), ref)
    monkeypatch.setattr(ggml_codes, "VALUE_ROWS", 3 * N)  # decoded by slices of 3 rows, as big tensors are
    np.testing.assert_array_equal(sub_grid(b, qtype, ROWS).values(codes.to(torch.int16)).numpy(), ref)
    monkeypatch.setattr(ggml_codes, "PACK_BLOCKS", 3)
    assert torch.equal(pack_codes(b, qtype, codes.to(torch.int16)), b)


@pytest.mark.parametrize("qtype", SCALAR_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("with_imatrix", [True, False], ids=["imatrix", "ref"])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
def test_without_feedback_the_bytes_are_llamas(data, qtype, with_imatrix, sliced, monkeypatch):
    """Feedback off = llama.cpp's own final rounding step: the same bytes (Q4_1/Q5_1 + imatrix: the
    nearest stored value, whose error is never larger, weight by weight); also with llama.cpp's
    rounding taken by row slices (`ROUND_ROWS`: 5 rows, so 4 slices of these 16), as big tensors are."""
    from gemmaquant.calib import ggml_gptq

    W, _, H, imatrix = data
    im = imatrix if with_imatrix else None
    llama = quantize(W, qtype, im)
    if sliced:
        whole = llama_rounding(W, qtype, im)
        monkeypatch.setattr(ggml_gptq, "ROUND_ROWS", 5 * N)
    r = llama_rounding(W, qtype, im)
    if sliced:  # every field of the opened-up rounding is the whole tensor's
        for f in ("data", "codes", "iscale", "offset", "keep"):
            a, b = getattr(r, f), getattr(whole, f)
            assert (a is None and b is None) or torch.equal(a, b), f
        assert torch.equal(r.grid.A, whole.grid.A) and (r.kind, r.inexact) == (whole.kind, whole.inexact)
        assert (r.grid.B is None and whole.grid.B is None) or torch.equal(r.grid.B, whole.grid.B)
    codes = r.decide(W)
    ours = pack_codes(r.data, qtype, codes)
    if with_imatrix and qtype in INEXACT:
        assert r.inexact > 0
        err_ours = (r.grid.values(codes) - W).abs()
        err_llama = (r.grid.values(r.codes) - W).abs()
        assert (err_ours <= err_llama).all()
        assert (ours != llama).any()  # the test sees the difference it allows
    else:
        assert torch.equal(ours, llama)
        assert torch.equal(optimize_tensor(W, H, qtype, im, feedback=False).data, llama)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q3_K, T.Q6_K, T.IQ4_XS], ids=lambda t: t.name)
def test_column_loop_with_a_diagonal_hessian_is_plain_rounding(data, qtype):
    """GPTQ's own loop, fed a diagonal H, has no error to feed forward: llama.cpp's codes."""
    W, _, H, imatrix = data
    r = llama_rounding(W, qtype, imatrix)
    f = hessian_factor(torch.diag(H.diagonal()), damp=0.0)
    assert torch.equal(gptq_codes(W, f, r), r.decide(W))
    assert torch.equal(r.decide(W), r.codes)


@pytest.mark.parametrize("qtype", SCALAR_TYPES, ids=lambda t: t.name)
def test_feedback_lowers_layer_error_and_keeps_the_scales(data, qtype):
    W, X, H, imatrix = data
    o = optimize_tensor(W, H, qtype, imatrix, refit=False)
    llama = quantize(W, qtype, imatrix)
    ref_values = sub_grid(llama, qtype, ROWS).values(unpack_codes(llama, qtype, ROWS))
    direct = lambda v: float(((X.double() @ (W - v).double().T) ** 2).sum())  # noqa: E731
    assert o.loss < 0.9 * o.loss_llama
    assert direct(o.values) < 0.9 * direct(ref_values)
    assert o.loss_llama == pytest.approx(direct(ref_values), rel=1e-3)
    # same size, same scale fields: only code bytes differ
    assert o.data.shape == llama.shape
    assert torch.equal(sub_grid(o.data, qtype, ROWS).A, sub_grid(llama, qtype, ROWS).A)
    from gguf.quants import dequantize as gguf_dequantize

    np.testing.assert_array_equal(gguf_dequantize(o.data.numpy(), int(qtype)).reshape(ROWS, N), o.values.numpy())


def test_act_order_and_block_size_do_not_break_validity(data):
    W, _, H, imatrix = data
    a = optimize_tensor(W, H, T.Q4_K, imatrix, act_order=False, block_size=32)
    b = optimize_tensor(W, H, T.Q4_K, imatrix, act_order=True, block_size=128)
    assert a.loss < a.loss_llama and b.loss < b.loss_llama
    same = optimize_tensor(W, H, T.Q4_K, imatrix, act_order=False, block_size=512)
    assert torch.equal(same.data, a.data)  # lazy block updates are exact: block size changes nothing


@pytest.mark.parametrize("qtype", [T.Q4_K, T.IQ3_S], ids=lambda t: t.name)
def test_a_factor_released_after_its_codes_gives_the_same_bytes(data, qtype):
    """`release`: the last Linear of an input lets its factor's U go once its codes are chosen (the refit
    and the losses read H only); the bytes and losses are those of a kept factor."""
    W, _, H, imatrix = data
    grid = qtype == T.IQ3_S
    run = optimize_grid_tensor if grid else optimize_tensor
    f = hessian_factor(H, group=4 if grid else 1)
    kept = run(W, H, qtype, imatrix, factor=f)
    assert f.U is not None
    released = run(W, H, qtype, imatrix, factor=f, release=True)
    assert f.U is None
    assert torch.equal(kept.data, released.data) and torch.equal(kept.values, released.values)
    assert (kept.loss, kept.loss_llama) == (released.loss, released.loss_llama) and kept.loss < kept.loss_llama


def test_codes_that_do_not_lower_the_loss_give_way_to_llamas_bytes(data, monkeypatch):
    """A rank-poor H can mislead error feedback: if its codes do not lower the calibration loss, the
    tensor keeps llama.cpp's bytes, and the values returned are what those bytes decode to."""
    import gemmaquant.calib.ggml_gptq as gg
    from gguf.quants import dequantize as gguf_dequantize

    W, _, H, imatrix = data
    monkeypatch.setattr(gg, "gptq_codes", lambda W, f, r, **k: torch.zeros_like(r.codes))  # bad codes
    o = optimize_tensor(W, H, T.Q4_K, imatrix)
    assert torch.equal(o.data, quantize(W, T.Q4_K, imatrix)) and o.loss == o.loss_llama
    np.testing.assert_array_equal(gguf_dequantize(o.data.numpy(), int(T.Q4_K)).reshape(ROWS, N), o.values.numpy())


def test_iq3_s_block_feedback(data):
    W, X, H, imatrix = data
    from gguf.quants import dequantize as gguf_dequantize

    o = optimize_grid_tensor(W, H, T.IQ3_S, imatrix)
    llama = quantize(W, T.IQ3_S, imatrix)
    assert o.loss < 0.9 * o.loss_llama
    np.testing.assert_array_equal(gguf_dequantize(o.data.numpy(), int(T.IQ3_S)).reshape(ROWS, N), o.values.numpy())
    b, ref = o.data.view(-1, 110), llama.view(-1, 110)
    assert torch.equal(b[:, 0:2], ref[:, 0:2]) and torch.equal(b[:, 106:110], ref[:, 106:110])  # d, scales
    # row 3 has an all-zero sub-block: llama.cpp's writer shifts that block's slots; it stays llama's
    r = llama_grid_rounding(W, imatrix)
    assert r.frozen[3, 0] and not r.frozen[2, 0]
    assert torch.equal(o.data[3, :110], llama[3, :110])


def test_codes_out_of_range_are_refused(data):
    W, _, _, imatrix = data
    b = quantize(W, T.Q4_0, imatrix)
    codes = unpack_codes(b, T.Q4_0, ROWS)
    codes[0, 0] = 16
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(b, T.Q4_0, codes)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", sorted(set(SCALAR_TYPES) - INEXACT), ids=lambda t: t.name)
def test_without_feedback_the_bytes_are_libggmls(data, qtype):
    """Straight against llama.cpp's ggml_quantize_chunk, with the imatrix."""
    from tests.numerics.ggml.libggml import ggml_quantize

    W, _, H, imatrix = data
    ref = ggml_quantize(W, int(qtype), imatrix)
    assert torch.equal(optimize_tensor(W, H, qtype, imatrix, feedback=False).data, ref)


def test_layer_loss_is_the_output_error(data):
    W, X, H, _ = data
    V = W + 0.001 * torch.randn_like(W)
    assert layer_loss(W, V, H) == pytest.approx(float(((X.double() @ (W - V).double().T) ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("path", ["narrow", "wide"])
@pytest.mark.parametrize("qtype", SCALAR_TYPES, ids=lambda t: t.name)
def test_refit_solves_the_fp16_fields_and_touches_nothing_else(data, qtype, path, monkeypatch):
    """The refit's fields against an independent least-squares solve in X space (numpy lstsq of
    X·basis against X·w, per row, rounded to fp16 as the block stores it); codes and integer
    sub-scales unchanged; no row's loss goes up; gguf-py decodes the bytes to our values. `wide`: the
    input counts as wide (calib/hessian.py), so the factor, the forms and the refit's normal equations
    take their wide-input paths."""
    from gguf.quants import dequantize as gguf_dequantize

    from gemmaquant.calib import hessian
    from gemmaquant.calib.ggml_refit import FIELDS, bases, refit
    from gemmaquant.calib.hessian import error_losses
    from gemmaquant.numerics.ggml.types import BLOCK

    if path == "wide":
        monkeypatch.setattr(hessian, "WIDE", N // 2)
    W, X, H, imatrix = data
    plain = optimize_tensor(W, H, qtype, imatrix, refit=False)
    o = optimize_tensor(W, H, qtype, imatrix)
    codes = unpack_codes(plain.data, qtype, ROWS)
    assert torch.equal(unpack_codes(o.data, qtype, ROWS), codes)
    size, nbytes = BLOCK[qtype]
    mask = torch.ones(nbytes, dtype=torch.bool)
    for at in FIELDS[qtype]:
        mask[at:at + 2] = False
    assert torch.equal(o.data.view(-1, nbytes)[:, mask], plain.data.view(-1, nbytes)[:, mask])
    assert o.loss < plain.loss
    # the loss the refit reports (its rows' losses, not taken again) is that of the bytes
    assert o.loss == pytest.approx(float(((X.double() @ (W - o.values).double().T) ** 2).sum()), rel=1e-4)
    np.testing.assert_array_equal(gguf_dequantize(o.data.numpy(), int(qtype)).reshape(ROWS, N), o.values.numpy())

    Hd = H.double()
    refitted = refit(W, H, plain.data, qtype, codes)
    v_old = sub_grid(plain.data, qtype, ROWS).values(codes)
    v_new = sub_grid(refitted, qtype, ROWS).values(codes)
    assert (error_losses(W, v_new, Hd) <= error_losses(W, v_old, Hd)).all()
    B = bases(plain.data, qtype, codes).reshape(ROWS, N // size, len(FIELDS[qtype]), size)
    Xd = X.double().numpy()
    for r in range(ROWS):
        basis = np.zeros((N, B.shape[1] * B.shape[2]))
        for b in range(B.shape[1]):
            for k in range(B.shape[2]):
                basis[b * size:(b + 1) * size, b * B.shape[2] + k] = B[r, b, k].numpy()
        XB = Xd @ basis
        f, *_ = np.linalg.lstsq(XB, Xd @ W[r].double().numpy(), rcond=None)
        ref = torch.from_numpy(basis @ f.astype(np.float16).astype(np.float64))
        ref_loss = float(error_losses(W[r:r + 1], ref[None], Hd)[0])
        got = float(error_losses(W[r:r + 1], v_new[r:r + 1], Hd)[0])
        assert got <= ref_loss * (1 + 1e-3) + 1e-12, (r, got, ref_loss)
