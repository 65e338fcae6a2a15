"""Our scales, zero points and codes equal compressed-tensors' own (calculate_qparams, quantize, and
the compressors' compress) for the same inputs: bf16 weights, bf16 scales, ct 0.20 conventions."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.numerics.ct import (FP8_MAX, fp8_scale, int_codes, int_qparams, minmax, pack_int, quantize_fp8,
                           quantize_int8, quantize_pack)

ct_q = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.compressors.naive_quantized.base import (  # noqa: E402
    FloatQuantizationCompressor, IntQuantizationCompressor)
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402

QArgs, QScheme = ct_q.QuantizationArgs, ct_q.QuantizationScheme


def weight(n=48, k=256, seed=0, dtype=torch.bfloat16):
    """Gaussian weights with a few outliers and one row of exact zeros (scale -> eps)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, 17] = 0.9
    w[5, 200] = -1.3
    w[7] = w[7].abs()  # all-positive row: asymmetric min clamps to 0
    w[9] = 0.0
    return w.to(dtype)


def _ct_qparams(w, args):
    """ct's min-max observer arithmetic, fed the weight's own (bf16) min/max like llm-compressor."""
    if args.strategy == "group":
        mn = w.unflatten(-1, (-1, args.group_size)).amin(-1)
        mx = w.unflatten(-1, (-1, args.group_size)).amax(-1)
    elif args.strategy == "channel":
        mn, mx = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        mn, mx = torch.aminmax(w)
    return calculate_qparams(mn, mx, args)


INT_CASES = [  # (bits, symmetric, group_size or None for channel)
    (4, True, 128), (4, False, 128), (4, True, 32), (4, False, 64), (8, True, None), (8, False, None),
    (4, True, None), (8, True, 128), (8, False, 128),
]


@pytest.mark.parametrize("bits,sym,gs", INT_CASES)
def test_int_qparams_and_codes_match_compressed_tensors(bits, sym, gs):
    w = weight()
    args = QArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if gs else "channel", group_size=gs)
    ct_scale, ct_zp = _ct_qparams(w, args)
    scale, zp = int_qparams(*minmax(w, args.strategy, gs), bits, sym)
    assert scale.dtype == torch.bfloat16 and ct_scale.dtype == torch.bfloat16
    assert torch.equal(scale, ct_scale)
    if sym:
        assert zp is None and not ct_zp.any()
    else:
        nonzero = scale != torch.finfo(torch.bfloat16).eps  # ct's all-zero group gives zp = NaN cast to int
        assert torch.equal(zp[nonzero], ct_zp.to(torch.int8)[nonzero])
    ours = int_codes(w, scale, zp, bits)
    theirs = ct_quantize(w, scale, zp if zp is not None else None, args, dtype=torch.int8)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("bits,sym,gs", INT_CASES)
def test_pack_quantize_matches_ct_compressor(bits, sym, gs):
    w = weight(seed=1)
    args = QArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if gs else "channel", group_size=gs)
    p = quantize_pack(w, bits, group_size=gs, symmetric=sym)
    state = {"weight": w, "weight_scale": p.weight_scale}
    if not sym:  # same zero points for both (the all-zero group's zp is arbitrary)
        state["weight_zero_point"] = int_qparams(*minmax(w, args.strategy, gs), bits, sym)[1]
    theirs = PackedQuantizationCompressor.compress(state, QScheme(targets=["Linear"], weights=args))
    assert set(p.tensors()) == set(theirs) - ({"weight_zero_point"} if sym else set())
    assert torch.equal(p.weight_packed, theirs["weight_packed"])
    assert torch.equal(p.weight_shape, theirs["weight_shape"].to(torch.int64))
    assert p.weight_packed.shape == (w.shape[0], w.shape[1] * bits // 32)
    if not sym:
        assert torch.equal(p.weight_zero_point, theirs["weight_zero_point"])
        assert p.weight_zero_point.shape == (-(-w.shape[0] * bits // 32), p.weight_scale.shape[1])


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_scale_and_values_match_compressed_tensors(strategy):
    w = weight(seed=2)
    args = QArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    ct_scale, _ = _ct_qparams(w, args)
    ours = quantize_fp8(w, strategy)
    assert torch.equal(ours.weight_scale, ct_scale)
    assert ours.weight_scale.shape == ((w.shape[0], 1) if strategy == "channel" else (1,))
    theirs = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": ct_scale},
                                                  QScheme(targets=["Linear"], weights=args))
    assert ours.weight.dtype == theirs["weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(ours.weight.view(torch.uint8), theirs["weight"].view(torch.uint8))


def test_int8_w8a8_matches_compressed_tensors():
    w = weight(seed=3)
    args = QArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    ct_scale, _ = _ct_qparams(w, args)
    ours = quantize_int8(w)
    assert torch.equal(ours.weight_scale, ct_scale)
    theirs = IntQuantizationCompressor.compress({"weight": w, "weight_scale": ct_scale},
                                                QScheme(targets=["Linear"], weights=args))
    assert ours.weight.dtype == torch.int8 and torch.equal(ours.weight, theirs["weight"])
    assert ours.weight.max() == 127 and ours.weight.min() >= -128  # /127.5: the row max clamps to 127


def test_external_scales_and_fp32_weights_match_compressed_tensors():
    """GPTQ/AWQ pass their own scales, and may hold fp32 weights: same codes as ct for the same inputs."""
    w = weight(seed=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    scale = (torch.rand(48, 2, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
    zp = torch.randint(-3, 3, (48, 2), generator=g, dtype=torch.int8)
    args = QArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128)
    p = quantize_pack(w, 4, group_size=128, symmetric=False, scale=scale, zero_point=zp)
    theirs = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                   QScheme(targets=["Linear"], weights=args))
    assert torch.equal(p.weight_packed, theirs["weight_packed"])
    assert torch.equal(p.weight_zero_point, theirs["weight_zero_point"])
    # already-rounded codes from another algorithm pack to the same bytes
    codes = int_codes(w, scale, zp, 4)
    assert torch.equal(pack_int(codes, scale, zp, 4).weight_packed, p.weight_packed)
    f = quantize_fp8(w, "tensor", scale=torch.tensor([0.002]), input_scale=0.25)
    assert f.weight_scale.dtype == torch.bfloat16 and f.input_scale.shape == (1,)
    assert f.input_scale.item() == 0.25


def test_fp8_saturates_instead_of_nan():
    w = torch.tensor([[1.0, -1.0, 0.5, 1e-3]], dtype=torch.bfloat16)
    f = quantize_fp8(w, scale=torch.tensor([[1e-3]]))  # 1.0 / 1e-3 = 1000 > 448
    v = f.weight.float()
    assert not v.isnan().any()
    assert v.tolist()[0][:3] == [FP8_MAX, -FP8_MAX, FP8_MAX]
    assert fp8_scale(torch.zeros(2, 4, dtype=torch.bfloat16)).eq(torch.finfo(torch.bfloat16).eps).all()


def test_bad_inputs_are_refused():
    w = weight()
    with pytest.raises(ValueError, match="NaN"):
        quantize_fp8(torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="divisible"):
        quantize_pack(w[:, :200], 4, group_size=128)
    with pytest.raises(ValueError, match="shape"):
        quantize_pack(w, 4, group_size=128, scale=torch.ones(48, 1))
    with pytest.raises(ValueError, match="range"):
        quantize_pack(w, 4, group_size=128, symmetric=False, scale=torch.ones(48, 2),
                      zero_point=torch.full((48, 2), 9))
    with pytest.raises(ValueError, match="> 0"):
        quantize_int8(w, scale=torch.zeros(48, 1))


@pytest.mark.parametrize("scheme_name", ["fp8", "fp8-static", "int8", "int8-w8a16", "w4a16", "w4a16-asym"])
def test_writer_path_is_ct_quantize_in_float32(scheme_name):
    """quantize_for (what the writer calls) rounds in float32: equal to ct's compressor fed the
    bf16 weight upcast to float32 with our stored bf16 scale and zero point."""
    from gemmaquant.numerics.ct import quantize_for
    from gemmaquant.schemes import get_scheme

    s = get_scheme(scheme_name)
    w = weight(seed=6)
    p = quantize_for(w, s.ct_format, s.weights, input_scale=0.01 if scheme_name == "fp8-static" else None)
    a = s.weights
    args = QArgs(num_bits=a.num_bits, type=a.type, symmetric=a.symmetric, strategy=a.strategy, group_size=a.group_size)
    state = {"weight": w.float(), "weight_scale": p.weight_scale}
    if not a.symmetric:
        state["weight_zero_point"] = int_qparams(*minmax(w.float(), a.strategy, a.group_size), a.num_bits, False)[1]
    comp = {"float-quantized": FloatQuantizationCompressor, "int-quantized": IntQuantizationCompressor,
            "pack-quantized": PackedQuantizationCompressor}[s.ct_format]
    theirs = comp.compress(state, QScheme(targets=["Linear"], weights=args))
    for k, t in p.tensors().items():
        if k == "input_scale":
            continue
        ref = theirs[k]
        assert t.dtype == (ref.dtype if k != "weight_shape" else torch.int64), k
        assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                           ref.view(torch.uint8) if ref.dtype == torch.float8_e4m3fn else ref.to(t.dtype)), k
