"""Optimized GGUF tensor bytes from calibration text, streaming one decoder layer at a time.

    ids ──embed──► h
    for each layer i (calib/runner.py, sequential):  hooks collect Σx² and XᵀX of every Linear input
        for each Linear with a planned GGML type:     imatrix = Σx²/count (llama-imatrix's in_sum2/count)
                                                      bytes = optimize_tensor(W, XᵀX, type, imatrix)
                                                      sink(GGUF name, bytes); W ← what the bytes decode to
        h = layer(h)   (the quantized layer: layer i+1 is calibrated on what it will really see)

Tensors outside the decoder layers (token_embd) and types without error-feedback rounding keep
llama.cpp's bytes; the latter are still written back dequantized so later layers see them.
Deterministic: the same ids give the same bytes (torch's CPU forward, GPTQ and the bit-exact GGML
searches do not depend on the thread count; tests check 1 vs 2 threads).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import GemmaQuantError
from ..formats.checkpoint import Checkpoint
from ..numerics.ggml.dequantize import dequantize
from ..numerics.ggml.quantize import quantize
from ..numerics.ggml.types import GGMLType
from ..formats.gguf.names import gguf_name
from .ggml_codes import SCALAR_TYPES
from .ggml_gptq import DAMP, hessian_factor, layer_loss, optimize_tensor
from .runner import Progress, run_layers
from .stats import INPUT_OF

Sink = Callable[[str, np.ndarray], None]


@dataclass
class TensorResult:
    name: str  # GGUF name
    qtype: GGMLType
    loss_llama: float  # ||X(W − Ŵ)ᵀ||² on the calibration inputs, llama.cpp's bytes
    loss: float  # ours
    optimized: bool  # False: llama.cpp's bytes (type without error feedback)


@dataclass
class OptimizeReport:
    tensors: list[TensorResult] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        opt = [t for t in self.tensors if t.optimized]
        if not opt:
            return "no tensor optimized"
        ratio = float(np.exp(np.mean([np.log(max(t.loss, 1e-30) / max(t.loss_llama, 1e-30)) for t in opt])))
        return (f"{len(opt)} of {len(self.tensors)} tensors rounded with error feedback on {self.tokens} tokens; "
                f"layer-output error vs llama.cpp's bytes: geometric mean {ratio:.3f}x ({self.seconds:.0f} s)")


def supports(qtype: GGMLType) -> bool:
    """Can this type's codes be chosen with error feedback?"""
    from .ggml_gptq_grid import GRID_TYPES

    return qtype in SCALAR_TYPES or qtype in GRID_TYPES


def imatrix_of(sum_sq: torch.Tensor, count: int) -> torch.Tensor:
    """llama-quantize's importance from an imatrix entry: in_sum2 / float(lround(count)), float32."""
    return sum_sq.float() / float(round(count))


def optimize_layer_tensor(W: torch.Tensor, H: torch.Tensor, qtype: GGMLType, imatrix: torch.Tensor, *,
                          feedback: bool = True, damp: float = DAMP, act_order: bool = True,
                          factors: dict | None = None):
    """(bytes [rows, row_bytes] uint8, decoded values [rows, n], loss_llama, loss, optimized).
    `factors`: a cache of H's factors (per group size), shared by the Linears reading the same input."""
    from .ggml_gptq_grid import optimize_grid_tensor

    W = W.to(torch.bfloat16).float()  # what llama-quantize reads from the converter's bf16 GGUF
    grid = qtype not in SCALAR_TYPES
    if supports(qtype):
        factor = None
        if feedback:
            group = 4 if grid else 1
            factors = {} if factors is None else factors
            if group not in factors:
                factors[group] = hessian_factor(H, damp=damp, act_order=act_order, group=group)
            factor = factors[group]
        run = optimize_grid_tensor if grid else optimize_tensor
        o = run(W, H, qtype, imatrix, feedback=feedback, factor=factor)
        return o.data, o.values, o.loss_llama, o.loss, True
    data = quantize(W, qtype, imatrix)
    values = dequantize(data, qtype, tuple(W.shape))
    loss = layer_loss(W, values, H)
    return data, values, loss, loss, False


def optimize_gguf_tensors(ckpt: Checkpoint, types: dict[str, GGMLType], ids: torch.Tensor, *,
                          sink: Sink | None = None, feedback: bool = True, damp: float = DAMP,
                          act_order: bool = True, batch_size: int = 4, progress: Progress | None = None,
                          layers: range | None = None) -> OptimizeReport:
    """Error-feedback bytes for every decoder-layer Linear named in `types` (GGUF name -> type).

    `sink(name, bytes)` receives each tensor's bytes (uint8 [rows, row_bytes]) as its layer finishes."""
    t0 = time.perf_counter()
    gen = ckpt.config.generation
    rep = OptimizeReport(tokens=int(ids.numel()))

    def on_layer(i, layer, stats):
        prefix = f"model.layers.{i}."
        factors: dict[int, dict] = {}  # id(stats) -> H factors: q/k/v and gate/up share their input
        todo = []
        for sfx in INPUT_OF:  # every decoder-layer Linear, in order
            name = gguf_name(prefix + sfx + ".weight", gen)
            qtype = types.get(name)
            if qtype is not None and qtype not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
                todo.append((sfx, name, qtype))
        last = {id(stats[prefix + sfx]): sfx for sfx, _, _ in todo}
        for sfx, name, qtype in todo:
            st = stats[prefix + sfx]
            lin = layer.get_submodule(sfx)
            try:
                data, values, loss_llama, loss, optimized = optimize_layer_tensor(
                    lin.weight.detach(), st.xtx, qtype, imatrix_of(st.sum_sq, st.count),
                    feedback=feedback, damp=damp, act_order=act_order, factors=factors.setdefault(id(st), {}))
            except GemmaQuantError as e:
                raise GemmaQuantError(f"{name}: {e}") from None
            if last[id(st)] == sfx:  # its input's XᵀX and factor go before the next input's (31B: 1-2 GB each)
                st.xtx = None
                factors.pop(id(st))
            rep.tensors.append(TensorResult(name, qtype, loss_llama, loss, optimized))
            if sink is not None:
                sink(name, data.numpy())
            with torch.no_grad():
                lin.weight.copy_(values.to(lin.weight.dtype))

    run_layers(ckpt, ids, kinds={"xtx", "sum_sq"}, on_layer=on_layer, sequential=True, batch_size=batch_size,
               progress=progress, layers=layers)
    rep.seconds = time.perf_counter() - t0
    return rep
