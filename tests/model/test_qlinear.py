"""Quantized Linear modules equal a dense Linear over the reference-dequantized weight.

References: the `gguf` package's numpy dequantizers (GGML blocks) and compressed-tensors'
decompressors and fake-quantizer (FP8/INT8/packed INT4/INT8); libggml's Q8_0/Q8_K row quantizers for
llama.cpp's CPU rounding of activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gguf
from gemmaquant.numerics.ct import quantize_fp8, quantize_int8, quantize_pack
from gemmaquant.numerics.ggml.quantize import quantize as ggml_quantize
from gemmaquant.numerics.ggml.types import GGMLType
from gemmaquant.model.qlinear import (DenseLinear, FP8Linear, GGMLLinear, Int8Linear, PackedLinear, QuantEmbedding,
                                act_block, fp8_act_quant, ggml_act_quant, int8_act_quant)

ct_q = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.compressors.naive_quantized.base import (  # noqa: E402
    FloatQuantizationCompressor, IntQuantizationCompressor)
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402

QArgs, QScheme = ct_q.QuantizationArgs, ct_q.QuantizationScheme


def _w(n=48, k=512, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.04
    w[3, 7] = 0.9  # an outlier
    return w.to(dtype)


def _x(k=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, k, generator=g)
    x[0, 1, 3] = 40.0  # a Gemma-like activation outlier in one token
    return x


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"])
def test_ggml_linear_equals_gguf_dequantize(qtype):
    t = GGMLType[qtype]
    w = _w(seed=int(t))
    data = ggml_quantize(w, t)
    ref = torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType(int(t))).astype(np.float32))
    ref = ref.reshape(w.shape)
    if t in (GGMLType.F16, GGMLType.BF16):
        m = DenseLinear(data.view(torch.float16 if t == GGMLType.F16 else torch.bfloat16))
    else:
        m = GGMLLinear(data, t, *w.shape)
    assert torch.equal(m.dequantize().float(), ref)
    assert torch.equal(m.dequantize(5, 17).float(), ref[5:17])
    x = _x()
    assert torch.allclose(m(x), F.linear(x, ref), rtol=1e-5, atol=1e-5)
    assert m.nbytes == data.numel()
    # as an embedding / LM head: row gathers and chunked logits
    emb = QuantEmbedding(m, chunk_rows=7)
    ids = torch.tensor([[0, 3, 47], [47, 1, 3]])
    assert torch.equal(emb(ids).float(), ref[ids])
    assert torch.allclose(emb.logits(x), x @ ref.T, rtol=1e-5, atol=1e-4)


def _scheme(**kw):
    return QScheme(targets=["Linear"], weights=QArgs(**kw))


@pytest.mark.parametrize("bits,sym,gs", [(4, True, 128), (4, False, 128), (4, False, 32), (8, True, None)])
def test_packed_linear_equals_ct_decompress(bits, sym, gs):
    w = _w(seed=bits).to(torch.bfloat16)
    p = quantize_pack(w, bits, group_size=gs, symmetric=sym)
    ref = PackedQuantizationCompressor.decompress(
        p.tensors(), _scheme(num_bits=bits, type="int", symmetric=sym, strategy="group" if gs else "channel",
                             group_size=gs))["weight"]
    m = PackedLinear(p.weight_packed, p.weight_scale, bits, *w.shape, p.weight_zero_point)
    assert torch.equal(m.dequantize(), ref)
    x = _x()
    assert torch.allclose(m(x), F.linear(x, ref.float()), rtol=1e-5, atol=1e-5)
    x16 = x.to(torch.bfloat16)
    assert torch.equal(m(x16), F.linear(x16, ref))


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_weight_only_equals_ct_decompress(strategy):
    f = quantize_fp8(_w(seed=2).to(torch.bfloat16), strategy)
    ref = FloatQuantizationCompressor.decompress(
        f.tensors(), _scheme(num_bits=8, type="float", symmetric=True, strategy=strategy))["weight"]
    m = FP8Linear(f.weight, f.weight_scale, act=None)
    x = _x()
    assert torch.allclose(m(x), F.linear(x, ref.float()), rtol=1e-5, atol=1e-5)


def test_fp8_w8a8_dynamic_matches_fake_quantized_reference():
    """y = fakequant_token(x) @ W_ref^T with ct's FP8 fake-quantizer at vLLM's per-token scale."""
    f = quantize_fp8(_w(seed=3).to(torch.bfloat16), "channel")
    # vLLM applies the scales in float32 after the FP8 GEMM: decompress with a float32 scale
    wref = FloatQuantizationCompressor.decompress(
        {**f.tensors(), "weight_scale": f.weight_scale.float()},
        _scheme(num_bits=8, type="float", symmetric=True, strategy="channel"))["weight"]
    x = _x()
    scale = x.abs().amax(-1, keepdim=True) / 448.0
    args = QArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
    xq = fake_quantize(x, scale, None, args)
    ref = F.linear(xq, wref)
    ours = FP8Linear(f.weight, f.weight_scale, act="dynamic")(x)
    assert _rel(ours, ref) < 1e-5  # x·(1/s) (vLLM) vs x/s (ct) could flip a rare code
    assert _rel(ours, F.linear(x, wref)) > 1e-3  # the activation quantization is really applied
    q, s = fp8_act_quant(x)
    assert torch.allclose(q * s, xq, rtol=0.07, atol=0)  # within one e4m3 step


def test_int8_w8a8_dynamic_matches_fake_quantized_reference():
    q8 = quantize_int8(_w(seed=4).to(torch.bfloat16))
    wref = IntQuantizationCompressor.decompress(
        {**q8.tensors(), "weight_scale": q8.weight_scale.float()},
        _scheme(num_bits=8, type="int", symmetric=True, strategy="channel"))["weight"]
    x = _x()
    scale = x.abs().amax(-1, keepdim=True) / 127.0  # vLLM dynamic_scaled_int8_quant
    args = QArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    ref = F.linear(fake_quantize(x, scale, torch.zeros_like(scale, dtype=torch.int8), args), wref)
    m = Int8Linear(q8.weight, q8.weight_scale, act="dynamic")
    ours = m(x)
    assert _rel(ours, ref) < 1e-5
    assert _rel(ours, F.linear(x, wref)) > 1e-3
    codes, s = int8_act_quant(x)
    assert codes.abs().max() == 127 and torch.equal(codes, codes.round())
    # weight-only use of the same tensors equals the dense reference (decompressed in bf16, as ct does)
    w16 = IntQuantizationCompressor.decompress(
        q8.tensors(), _scheme(num_bits=8, type="int", symmetric=True, strategy="channel"))["weight"]
    assert torch.allclose(Int8Linear(q8.weight, q8.weight_scale, act=None)(x), F.linear(x, w16.float()), atol=1e-5)


def test_int8_static_asymmetric_input():
    q8 = quantize_int8(_w(seed=5).to(torch.bfloat16))
    wref = q8.weight.float() * q8.weight_scale.float()
    x = _x()
    s, zp = torch.tensor([0.35]), torch.tensor([-7], dtype=torch.int8)
    args = QArgs(num_bits=8, type="int", symmetric=False, strategy="tensor")
    ref = F.linear(fake_quantize(x, s, zp, args), wref)
    ours = Int8Linear(q8.weight, q8.weight_scale, act="static", input_scale=s, input_zero_point=zp)(x)
    assert _rel(ours, ref) < 1e-4


def test_forward_without_autograd_reuses_one_buffer_and_stays_exact():
    """Inference forwards dequantize into the shared scratch buffer: layers of other formats and
    shapes in turn, and an LM head in chunks, each equal to its reference; with autograd on,
    the weight is a fresh tensor and backward works."""
    from gemmaquant.model.qlinear import free_scratch

    free_scratch()
    mods, refs = [], []
    for i, (qtype, n) in enumerate([("Q4_K", 48), ("Q8_0", 96), ("Q6_K", 32)]):
        t = GGMLType[qtype]
        w = _w(n=n, seed=10 + i)
        data = ggml_quantize(w, t)
        mods.append(GGMLLinear(data, t, *w.shape))
        ref = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType(int(t))).astype(np.float32)
        refs.append(torch.from_numpy(ref).reshape(w.shape))
    f = quantize_fp8(_w(n=64, seed=20).to(torch.bfloat16), "channel")
    fp8 = FP8Linear(f.weight, f.weight_scale, act="dynamic")
    x = _x()
    with torch.no_grad():
        fp8_expect = fp8(x)
    emb = QuantEmbedding(mods[1], chunk_rows=40)
    with torch.inference_mode():
        for _ in range(2):
            for m, ref in zip(mods, refs):
                assert torch.equal(m(x), F.linear(x, ref))
            assert torch.equal(emb.logits(x)[..., 40:80], F.linear(x, refs[1][40:80]))
            assert torch.equal(fp8(x), fp8_expect)
    xg = x.clone().requires_grad_()
    mods[0](xg).sum().backward()
    assert torch.allclose(xg.grad, refs[0].sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.IQ4_NL,
                                   GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.IQ4_XS])
def test_ggml_act_quant_is_libggml_rounding(qtype):
    """llama.cpp's CPU matmul rounds activations to its weight type's vec_dot_type: Q8_0 for the
    32-weight types, Q8_K for the 256-weight ones. Ours equals libggml's own row quantizer and
    dequantizer bit for bit, outliers, zero blocks and exact ties included."""
    from tests.numerics.ggml.libggml import ggml_round_activations

    x = _x(k=1024).reshape(-1, 1024)
    x[2, :256] = 0.0  # an all-zero block
    x[3, 5] = -x[3].abs().max() * 3  # the block's extreme is negative
    x[4, :32] = torch.arange(32) * (127 / 31 / 127)  # values on the grid's half steps
    block = act_block(qtype)
    assert block == (32 if qtype in (GGMLType.Q4_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.IQ4_NL) else 256)
    assert torch.equal(ggml_act_quant(x, qtype), ggml_round_activations(x, block))


def test_float_weights_keep_their_activations():
    x = _x(k=256)
    assert act_block(GGMLType.F32) is None and torch.equal(ggml_act_quant(x, GGMLType.F32), x)
    assert torch.equal(ggml_act_quant(x, GGMLType.BF16), x.to(torch.bfloat16).float())
