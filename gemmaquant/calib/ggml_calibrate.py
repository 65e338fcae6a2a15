"""Optimized GGUF tensor bytes from calibration text, streaming one decoder layer at a time.

    ids ──embed──► h
    for each layer i (calib/runner.py, sequential):  hooks collect Σx² and XᵀX of every Linear input
        for each Linear with a planned GGML type:     imatrix = Σx²/count (llama-imatrix's in_sum2/count)
                                                      bytes = optimize_tensor(W, XᵀX, type, imatrix)
                                                      sink(GGUF name, bytes); W ← what the bytes decode to
        h = layer(h)   (the quantized layer: layer i+1 is calibrated on what it will really see)

Memory: the statistics pass holds every input's XᵀX of the layer at once (31B's full-attention layers:
3.2 GB, beside the float32 layer's 2.1 GB). Then each wide input's XᵀX (over `hessian.WIDE` channels)
waits in a file beside the output until its Linears' turn, and again while their codes are chosen
from its factor, which is let go before the refit (`spill.Held`, `HessianFactor.release`): one n × n
matrix of the widest input at a time, not three.

Tensors outside the decoder layers (token_embd) and types without error-feedback rounding keep
llama.cpp's bytes; the latter are still written back dequantized so later layers see them.
Deterministic: the same ids give the same bytes (torch's CPU forward, GPTQ and the bit-exact GGML
searches do not depend on the thread count; tests check 1 vs 2 threads).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import GemmaQuantError
from ..formats.checkpoint import Checkpoint
from ..numerics.ggml.dequantize import dequantize
from ..numerics.ggml.quantize import quantize
from ..numerics.ggml.types import GGMLType
from ..formats.gguf.names import gguf_name
from .ggml_codes import SCALAR_TYPES
from . import hessian
from .ggml_gptq import DAMP, hessian_factor, layer_loss, optimize_tensor
from .runner import Progress, run_layers
from .spill import Held, held
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


def optimize_layer_tensor(W: torch.Tensor, H: torch.Tensor | Held, qtype: GGMLType, imatrix: torch.Tensor, *,
                          feedback: bool = True, damp: float = DAMP, act_order: bool = True,
                          factors: dict | None = None, last: bool = False):
    """(bytes [rows, row_bytes] uint8, decoded values [rows, n], loss_llama, loss, optimized).
    `factors`: a cache of H's factors (per group size), shared by the Linears reading the same input;
    `last`: no later Linear reads this input, its factor is released once the codes are chosen (the
    refit and the losses need H only)."""
    from .ggml_gptq_grid import optimize_grid_tensor

    W = W.to(torch.bfloat16).float()  # what llama-quantize reads from the converter's bf16 GGUF
    grid = qtype not in SCALAR_TYPES
    if supports(qtype):
        factor = None
        if feedback:
            group = 4 if grid else 1
            factors = {} if factors is None else factors
            if group not in factors:
                if isinstance(H, Held):
                    H.park()  # factored from its file's rows, if it has one: not beside its factor
                factors[group] = hessian_factor(H, damp=damp, act_order=act_order, group=group)
            factor = factors[group]
        run = optimize_grid_tensor if grid else optimize_tensor
        o = run(W, H, qtype, imatrix, feedback=feedback, factor=factor, release=last and factor is not None)
        return o.data, o.values, o.loss_llama, o.loss, True
    data = quantize(W, qtype, imatrix)
    values = dequantize(data, qtype, tuple(W.shape))
    loss = layer_loss(W, values, held(H).get())
    return data, values, loss, loss, False


def parked_bytes(ckpt: Checkpoint) -> int:
    """The disk `optimize_gguf_tensors(park=)` takes at most: the wide inputs' XᵀX (float32) of the layer
    where they are largest, all parked at once after its statistics pass (31B: 3.2 GB)."""
    names = set(ckpt.names())
    most = 0
    for i in range(ckpt.config.num_hidden_layers):
        widths = {src: ckpt.shape(f"model.layers.{i}.{sfx}.weight")[-1]
                  for sfx, src in INPUT_OF.items() if f"model.layers.{i}.{sfx}.weight" in names}
        most = max(most, sum(4 * n * n for n in widths.values() if n > hessian.WIDE))
    return most


def optimize_gguf_tensors(ckpt: Checkpoint, types: dict[str, GGMLType], ids: torch.Tensor, *,
                          sink: Sink | None = None, feedback: bool = True, damp: float = DAMP,
                          act_order: bool = True, batch_size: int = 4, progress: Progress | None = None,
                          layers: range | None = None, park: Path | None = None) -> OptimizeReport:
    """Error-feedback bytes for every decoder-layer Linear named in `types` (GGUF name -> type).

    `sink(name, bytes)` receives each tensor's bytes (uint8 [rows, row_bytes]) as its layer finishes.
    `park`: a directory where each wide input's XᵀX (over `hessian.WIDE` channels) waits in a file
    until its Linears are rounded, and while their codes are chosen (`spill.Held`): one wide XᵀX or
    factor is in memory at a time (31B: 1.85 GB, not the 3.2 GB of a layer's XᵀX plus a factor)."""
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
        hs: dict[int, Held] = {}  # id(stats) -> its XᵀX, which the stats no longer hold (it can be parked)
        try:
            for sfx, _, _ in todo:
                st = stats[prefix + sfx]
                if id(st) not in hs:
                    wide = st.xtx.shape[0] > hessian.WIDE
                    hs[id(st)] = Held(st.xtx, park if wide else None)
                    st.xtx = None
                    hs[id(st)].park()  # a wide one waits in a file until its Linears' turn
            for sfx, name, qtype in todo:
                st = stats[prefix + sfx]
                lin = layer.get_submodule(sfx)
                is_last = last[id(st)] == sfx
                try:
                    data, values, loss_llama, loss, optimized = optimize_layer_tensor(
                        lin.weight.detach(), hs[id(st)], qtype, imatrix_of(st.sum_sq, st.count), feedback=feedback,
                        damp=damp, act_order=act_order, factors=factors.setdefault(id(st), {}),
                        last=is_last)
                except GemmaQuantError as e:
                    raise GemmaQuantError(f"{name}: {e}") from None
                if is_last:  # its input's XᵀX and factor go before the next input's (31B: 1-2 GB each)
                    hs.pop(id(st)).close()
                    factors.pop(id(st))
                rep.tensors.append(TensorResult(name, qtype, loss_llama, loss, optimized))
                if sink is not None:
                    sink(name, data.numpy())
                with torch.no_grad():
                    lin.weight.copy_(values.to(lin.weight.dtype))
                del data, values
        finally:
            for h in hs.values():
                h.close()

    run_layers(ckpt, ids, kinds={"xtx", "sum_sq"}, on_layer=on_layer, sequential=True, batch_size=batch_size,
               progress=progress, layers=layers)
    rep.seconds = time.perf_counter() - t0
    return rep
