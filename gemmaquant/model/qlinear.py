"""Quantized drop-ins for `nn.Linear` / the tied embedding that keep the packed weights in memory.

Each module holds exactly what the artifact stores (GGML blocks as uint8 rows, FP8/INT8 codes with
their scales, int32-packed INT4/INT8 words) and dequantizes on every forward into the compute dtype,
so a loaded model needs about the artifact's size plus one layer's dequantized weight at a time.

Numerics:
  * weight-only formats (GGML, pack-quantized W4A16/W8A16): y = x @ dequant(W)^T in x.dtype, with
    W dequantized exactly as the reference decoders do (gguf / compressed-tensors), then cast.
  * W8A8 (FP8 and INT8 with `input_activations`): the activation quantization vLLM applies is
    simulated. Dynamic per-token (vLLM `dynamic_per_token_scaled_fp8_quant`,
    `dynamic_scaled_int8_quant`): s_t = absmax_t / QMAX (FP8 clamps s to >= 1/(448·512)),
    x_q = sat(round(x · (1/s_t))) with round-to-nearest-even (int8) or an fp8 cast (e4m3fn);
    then y = (x_q @ W_q^T) · s_t · s_w accumulated in float32 (the int32/fp32 GEMM accumulator) and
    cast back. Static input scales use the stored `input_scale` (and `input_zero_point` for
    asymmetric INT8). Known difference: vLLM fuses q/k/v (and gate/up) and requantizes per-tensor
    FP8 shards to their largest scale; we keep one scale per shard as the file does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics.ct.dequantize import dequantize_fp8, dequantize_int8, dequantize_packed
from ..numerics.ct.quantize import FP8_MAX
from ..numerics.ggml.types import BLOCK, GGMLType

Tensor = torch.Tensor
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor for dynamic per-token FP8 scales
INT8_MAX = 127.0


# -- activation quantization (pure functions) -----------------------------------------------------
def fp8_act_quant(x: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [..., K] → (codes as float32 on the e4m3fn grid, scale [..., 1] or [1] float32).
    scale None: dynamic per token; otherwise the static per-tensor scale."""
    xf = x.float()
    if scale is None:
        scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(FP8_MIN_SCALE)
    scale = scale.float()
    q = (xf * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return q, scale


def int8_act_quant(x: Tensor, scale: Tensor | None = None, zero_point: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
    """x [..., K] → (codes − zero point as float32, scale float32). Dynamic per token when `scale`
    is None: s = absmax/127, codes = sat(rint(x · 127/absmax)); an all-zero token gets codes 0."""
    xf = x.float()
    if scale is None:
        amax = xf.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, INT8_MAX / amax, torch.zeros_like(amax))
        return torch.round(xf * inv).clamp(-128, 127), amax / INT8_MAX
    scale = scale.float()
    q = torch.round(xf * (1.0 / scale))
    if zero_point is None:
        return q.clamp(-128, 127), scale
    zp = zero_point.float()
    return (q + zp).clamp(-128, 127) - zp, scale


# llama.cpp's CPU `vec_dot_type`: Q8_0 (or Q8_1, the same values) for the 32-weight types, IQ4_NL
# included; Q8_K for every 256-weight type (K-quants, IQ*, TQ*).
_Q8_0_ACT = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.IQ4_NL)


def act_block(qtype: GGMLType) -> int | None:
    """The block llama.cpp's CPU backend rounds a product's activations in for weights of `qtype`:
    32 (Q8_0/Q8_1), 256 (Q8_K), None for float weights (F32, F16, BF16: no 8-bit rounding)."""
    if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        return None
    return 32 if qtype in _Q8_0_ACT else 256


def ggml_act_quant(x: Tensor, qtype: GGMLType) -> Tensor:
    """The activation rounding of llama.cpp's CPU matmuls (`vec_dot_type` of the weight type), as a
    fake-quantized float32 x [..., K]:
      Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL weights → x as Q8_0 (Q8_1 holds the same values): per 32
        values d = amax/127, q = roundf(x/d) (half away from zero), value = fp16(d)·q;
      the 256-weight types (Q2_K…Q6_K, IQ*, TQ*) → Q8_K: per 256 values m = the signed value of largest |x|, s = −127/m,
        q = min(127, rint(s·x)), value = q/s (float32 scale);
      F16/BF16 → x rounded to that type; F32 → unchanged."""
    if qtype == GGMLType.F32:
        return x.float()
    if qtype in (GGMLType.F16, GGMLType.BF16):
        return x.to(torch.float16 if qtype == GGMLType.F16 else torch.bfloat16).float()
    block = act_block(qtype)
    xf = x.float().reshape(*x.shape[:-1], -1, block)
    if block == 32:
        d = xf.abs().amax(-1, keepdim=True) / 127.0
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        v = xf * inv
        q = torch.sign(v) * torch.floor(v.abs() + 0.5)  # roundf; |v| <= 127 so no 0.49999997 issue matters
        out = q * d.to(torch.float16).float()
    else:
        idx = xf.abs().argmax(-1, keepdim=True)  # first index of the largest |x|
        m = xf.gather(-1, idx)
        # tensor / tensor: torch computes `scalar / tensor` as a reciprocal times the scalar, 1 ulp off C's
        iscale = torch.where(m != 0, torch.full_like(m, -127.0) / m, torch.zeros_like(m))
        q = torch.round(xf * iscale).clamp(max=127)
        out = torch.where(m != 0, q * (torch.ones_like(iscale) / iscale), torch.zeros_like(xf))
    return out.reshape(x.shape)


# -- a reused buffer for dequantized weights --------------------------------------------------------
# Dequantizing into fresh CPU memory costs a page fault per 4 KiB written (about as much as the
# unpacking itself on a busy 2-core EPYC), and every forward of every layer would pay it again. So
# forward passes write their weights into one buffer per (device, dtype), reused by each layer in
# turn and grown to the largest weight met: memory stays the artifact plus one dequantized layer
# (or LM-head chunk). Only without autograd: F.linear keeps its weight for the backward pass, and a
# later layer would overwrite it.
_SCRATCH: dict[tuple[torch.device, torch.dtype, bool], Tensor] = {}


def scratch(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """A contiguous `shape` view of the shared buffer (its contents are garbage), or None when
    autograd is recording. Valid until the next call for the same device and dtype."""
    if torch.is_grad_enabled():
        return None
    device = torch.device(device)
    key = (device, dtype, torch.is_inference_mode_enabled())  # inference tensors are a separate kind
    n = math.prod(shape)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        _SCRATCH[key] = buf = None  # free the old one first
        _SCRATCH[key] = buf = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def free_scratch() -> None:
    """Drop the shared buffers (e.g. after evaluating a model, before loading another)."""
    _SCRATCH.clear()


# -- modules --------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """Base class: `dequantize(start, stop)` gives rows [start, stop) of the weight, [rows, in]."""

    fmt = "?"

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features

    def dequantize(self, start: int = 0, stop: int | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def weight_for(self, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows [start, stop) of the weight in x.dtype, for immediate use by a matmul: it may live in
        the shared scratch buffer, which the next layer overwrites."""
        w = self.dequantize(start, stop)
        if w.dtype == x.dtype:
            return w
        buf = scratch(tuple(w.shape), w.device, x.dtype)
        return w.to(x.dtype) if buf is None else buf.copy_(w)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_for(x))

    @property
    def nbytes(self) -> int:
        """Bytes of everything this weight stores (codes, scales, zero points)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def weight_count(self) -> int:
        return self.out_features * self.in_features

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"


class DenseLinear(QuantLinear):
    """An unquantized weight kept in its stored dtype (bf16/f16/f32), cast per use."""

    def __init__(self, weight: Tensor):
        super().__init__(*weight.shape)
        self.fmt = str(weight.dtype).replace("torch.", "")
        self.register_buffer("weight", weight)

    def dequantize(self, start=0, stop=None):
        return self.weight[start:stop]


class GGMLLinear(QuantLinear):
    """GGML blocks: `data` uint8 [out, row_bytes], row r = in/block consecutive blocks."""

    def __init__(self, data: Tensor, qtype: GGMLType, out_features: int, in_features: int,
                 llama_act: bool = False):
        super().__init__(out_features, in_features)
        self.llama_act = llama_act  # round activations as llama.cpp's CPU matmul does
        block, nbytes = BLOCK[qtype]
        if data.dtype != torch.uint8 or tuple(data.shape) != (out_features, in_features // block * nbytes) \
                or in_features % block:
            raise ValueError(f"{qtype.name} data {tuple(data.shape)} {data.dtype} does not hold "
                             f"[{out_features}, {in_features}]")
        self.qtype = qtype
        self.fmt = qtype.name
        self.register_buffer("data", data)

    def dequantize(self, start=0, stop=None):
        rows = self.data[start:stop]
        return dequantize_ggml_rows(rows, self.qtype, self.in_features)

    def weight_for(self, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        rows = self.data[start:stop]
        buf = scratch((rows.shape[0], self.in_features), rows.device)
        return dequantize_ggml_rows(rows, self.qtype, self.in_features, out=buf).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.llama_act:
            x = ggml_act_quant(x, self.qtype).to(x.dtype)
        return F.linear(x, self.weight_for(x))

    def gather(self, ids: Tensor) -> Tensor:
        """Rows `ids` (any shape) dequantized → [*ids.shape, in]."""
        rows = self.data[ids.reshape(-1)]
        return dequantize_ggml_rows(rows, self.qtype, self.in_features).view(*ids.shape, self.in_features)


def dequantize_ggml_rows(rows: Tensor, qtype: GGMLType, n_per_row: int, out: Tensor | None = None) -> Tensor:
    """uint8 [R, row_bytes] → float32 [R, n_per_row], into `out` when given (float types are
    reinterpreted in their own dtype, not converted, and ignore `out`)."""
    if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        dt = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}[qtype]
        return rows.contiguous().view(dt)
    from ..numerics.ggml.dequantize import dequantize

    return dequantize(rows.contiguous(), qtype, (rows.shape[0], n_per_row), out=out)


class FP8Linear(QuantLinear):
    """compressed-tensors float-quantized: e4m3fn [out, in], scale [out, 1] (channel) or [1] (tensor).
    act: None (weight only), "dynamic" (per token) or "static" (needs input_scale)."""

    fmt = "FP8"

    def __init__(self, weight: Tensor, weight_scale: Tensor, act: str | None = "dynamic",
                 input_scale: Tensor | None = None):
        super().__init__(*weight.shape)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.reshape(-1, 1) if weight_scale.numel() > 1
                             else weight_scale.reshape(1))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.reshape(1))
        self.act = act
        self.fmt = "FP8" + ("" if act is None else f" W8A8 ({act})")

    def dequantize(self, start=0, stop=None):
        s = self.weight_scale if self.weight_scale.numel() == 1 else self.weight_scale[start:stop]
        return dequantize_fp8(self.weight[start:stop], s)

    def forward(self, x):
        if self.act is None:
            return super().forward(x)
        xq, sx = fp8_act_quant(x, self.input_scale if self.act == "static" else None)
        y = F.linear(xq, _as_float32(self.weight))
        return (y * sx * self.weight_scale.float().reshape(-1)).to(x.dtype)


class Int8Linear(QuantLinear):
    """compressed-tensors int-quantized: int8 [out, in], scale [out, 1] or [1]; W8A8 as FP8Linear."""

    fmt = "INT8"

    def __init__(self, weight: Tensor, weight_scale: Tensor, act: str | None = "dynamic",
                 input_scale: Tensor | None = None, input_zero_point: Tensor | None = None):
        super().__init__(*weight.shape)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.reshape(-1, 1) if weight_scale.numel() > 1
                             else weight_scale.reshape(1))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.reshape(1))
        self.register_buffer("input_zero_point", None if input_zero_point is None else input_zero_point.reshape(1))
        self.act = act
        self.fmt = "INT8" + ("" if act is None else f" W8A8 ({act})")

    def dequantize(self, start=0, stop=None):
        s = self.weight_scale if self.weight_scale.numel() == 1 else self.weight_scale[start:stop]
        return dequantize_int8(self.weight[start:stop], s)

    def forward(self, x):
        if self.act is None:
            return super().forward(x)
        static = self.act == "static"
        xq, sx = int8_act_quant(x, self.input_scale if static else None,
                                self.input_zero_point if static else None)
        # int8·int8 products summed in float32: exact while |sum| < 2^24, which holds for K·127²
        # up to K ≈ 1040 and is within a few float32 ulps beyond (vLLM accumulates in int32).
        y = F.linear(xq, _as_float32(self.weight))
        return (y * sx * self.weight_scale.float().reshape(-1)).to(x.dtype)


class PackedLinear(QuantLinear):
    """compressed-tensors pack-quantized (W4A16 / W8A16, sym or asym, group or channel)."""

    def __init__(self, weight_packed: Tensor, weight_scale: Tensor, num_bits: int, out_features: int,
                 in_features: int, weight_zero_point: Tensor | None = None):
        super().__init__(out_features, in_features)
        self.num_bits = num_bits
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_zero_point", weight_zero_point)
        groups = weight_scale.shape[-1]
        gs = "channel" if groups == 1 else f"g{in_features // groups}"
        self.fmt = f"INT{num_bits} {gs} {'asym' if weight_zero_point is not None else 'sym'}"

    def dequantize(self, start=0, stop=None):
        w = dequantize_packed(self.weight_packed, self.weight_scale, (self.out_features, self.in_features),
                              self.num_bits, self.weight_zero_point)
        return w[start:stop]


def _as_float32(w: Tensor) -> Tensor:
    """FP8/INT8 codes as float32 (exact), in the scratch buffer when autograd is off."""
    buf = scratch(tuple(w.shape), w.device)
    return w.float() if buf is None else buf.copy_(w)


class QuantEmbedding(nn.Module):
    """The tied embedding / LM head over a QuantLinear of shape [vocab, hidden].

    Lookups dequantize only the rows asked for; `logits(h)` multiplies by the table in row chunks so
    that a float32 copy of a 262k-row table never exists at once."""

    def __init__(self, table: QuantLinear, chunk_rows: int = 16384):
        super().__init__()
        self.table = table
        self.chunk_rows = chunk_rows
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: Tensor) -> Tensor:
        t = self.table
        if isinstance(t, GGMLLinear):
            return t.gather(ids)
        if isinstance(t, DenseLinear):
            return t.weight[ids]
        return t.dequantize()[ids]

    def logits(self, h: Tensor) -> Tensor:
        """h [..., hidden] → h @ table^T [..., vocab] in h.dtype."""
        out = h.new_empty(*h.shape[:-1], self.num_embeddings)
        for start in range(0, self.num_embeddings, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.num_embeddings)
            out[..., start:stop] = F.linear(h, self.table.weight_for(h, start, stop))
        return out
