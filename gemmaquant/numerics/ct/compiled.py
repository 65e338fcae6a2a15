"""The torch.compile path for compressed-tensors weights (CPU only): w = (q - zp) * scale as one
fused loop, checked bit for bit against the plain kernel on its first call per dtypes; the switch
and the fallback rules are `numerics/compiling.py`'s.

Codes and q - zp are exact in bf16/f16/f32 and their product with the scale is exact in float32, so
computing in float32 and rounding once to the scale's dtype gives the bits of ct's bf16 arithmetic
(see `dequantize.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..compiling import DIFFERS, passed, same_bits, turn_off, why

_kernels: dict[str, Callable | None] = {}  # compiled kernel per expression name, None once it failed
_checked: set[tuple] = set()  # (name, code dtype, scale dtype, zero-point dtype)


def ct_scaled(q, scale):  # q [R, C], scale [1] or [R, 1] (groups come as rows of a reshaped q)
    return (q.float() * scale.float()).to(scale.dtype)


def ct_scaled_zp(q, scale, zp):
    return ((q.float() - zp.float()) * scale.float()).to(scale.dtype)


EXPRESSIONS = {"ct_scaled": ct_scaled, "ct_scaled_zp": ct_scaled_zp}


def ct_run(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, plain: Callable) -> torch.Tensor | None:
    """compressed-tensors' (q - zp) * scale with a compiled kernel; None where the compiled path does
    not apply or failed (the caller then runs `plain(q, scale, zero_point)`). The first call per
    kernel and dtypes is compared bit for bit with `plain` on the whole tensor."""
    if q.is_cuda or q.numel() == 0 or q.ndim != 2:
        return None
    grouped = scale.ndim == 2 and scale.shape[1] > 1
    if grouped and (q.shape[1] % scale.shape[1] or (zero_point is not None and zero_point.shape != scale.shape)):
        return None  # the plain path raises the clear error
    name = "ct_scaled" + ("_zp" if zero_point is not None else "")
    if name not in _kernels:
        _kernels[name] = torch.compile(EXPRESSIONS[name], fullgraph=True)
    kernel = _kernels[name]
    if kernel is None:
        return None
    n, k = q.shape
    args = [q, scale] if zero_point is None else [q, scale, zero_point]
    if grouped:  # group j of row i as row i*G + j: a [R, C] * [R, 1] loop, which inductor vectorizes
        g = scale.shape[1]  # with the sizes dynamic (a [N, G, K/G] view with K/G a symbol it does not)
        args = [q.contiguous().view(n * g, k // g)] + [t.reshape(n * g, 1) for t in args[1:]]
    for t in args:  # one graph for every weight shape, not one per shape until dims turn dynamic
        for d in range(t.ndim):
            if t.shape[d] > 1:
                torch._dynamo.maybe_mark_dynamic(t, d)
    try:
        got = kernel(*args).view(n, k)
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the plain path
        turn_off(_kernels, name, name, why(e))
        return None
    key = (name, q.dtype, scale.dtype, None if zero_point is None else zero_point.dtype)
    if key not in _checked:
        ref = plain(q, scale, zero_point)
        if not same_bits(ref, got):
            turn_off(_kernels, name, name, DIFFERS)
            return ref
        _checked.add(key)
        passed(f"{name}({str(q.dtype).removeprefix('torch.')})")
    return got
