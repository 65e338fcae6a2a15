"""Error-feedback (GPTQ-style) rounding inside the GGML grids: llama.cpp's scales, better codes.

llama-quantize sees one tensor at a time and weights each column by the imatrix (diag of XᵀX) only.
Here the layer's full H = XᵀX from calibration inputs decides the codes:

1. llama.cpp's own quantizer runs first (`ggml.quantize.quantize`, byte-identical to
   `ggml_quantize_chunk`) with the imatrix `diag(H)/tokens` = llama-imatrix's `in_sum2/count`: its
   scale bytes (d, dmin, sub-scales) are kept as they are, so the block layout, the file size and the
   scale search are llama.cpp's.
2. The codes are then chosen column by column (GPTQ, Frantar et al. 2022): each column is rounded onto
   the values its sub-block's stored scales allow, with llama.cpp's own rounding rule, and its error
   `(w − ŵ)/U_jj` is fed forward to the columns not yet rounded through the upper Cholesky factor U of
   H⁻¹ (lazy block updates, optional act-order: the scales are fixed up front, so any column order works).
3. The codes are packed back into llama.cpp's blocks (`ggml_codes.pack_codes`).
4. The blocks' fp16 fields (d, and dmin or m where the type has one) are re-solved by least squares
   for those codes (`ggml_refit.py`; `refit=False` keeps llama.cpp's): the integer sub-scales and the
   size stay, and a row keeps llama.cpp's fields unless the refit lowers its loss.

With the error feedback off (or H diagonal), step 2 is llama.cpp's final re-rounding step and the bytes
are llama.cpp's, for every type whose codes llama.cpp rounds against values it can reconstruct:
K-quants and Q6_K round `(x + dmin·m)/(d·sc)` against the stored scales; IQ4_NL/IQ4_XS, Q8_0 and the
reference Q4_0..Q5_1 against a float32 scale recomputed here from the weights; Q4_0/Q5_0 with an imatrix
against the search's own iscale, recovered as the one of its 19 candidates that reproduces llama's codes.
Only Q4_1/Q5_1 with an imatrix round against a search-internal (scale, min) that is not recoverable;
there the codes are the nearest stored values, never worse per weight than llama.cpp's.

The grid types (IQ3_S) store 4 weights per grid point: see `ggml_gptq_grid.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GemmaQuantError
from ..numerics.ggml.iq4 import best_index, kvalues, search_scales
from ..numerics.ggml.quantize import quantize
from ..numerics.ggml.search import GROUP_MAX_EPS, div, first_abs_max, nearest_int, roundf, running_min_max, seq_sum, sqrt
from ..numerics.ggml.types import GGMLType
from . import hessian
from .ggml_codes import RANGE, SCALAR_TYPES, SUB, SubGrid, pack_codes, sub_grid, unpack_codes
from .ggml_refit import refit_with_losses
from .spill import Held, held
from .threads import parallel_map, single_thread

T = GGMLType
# Damping of H, a fraction of mean(diag H). Not GPTQ's usual 0.01: the calibration text is one text,
# and the less H is damped, the lower the error on its own inputs and the higher on other text's.
# 0.3 beat 0.1 on six of the seven types llama-perplexity judged on held-out text and tied on the
# seventh (RESULTS.md §11, fifth round).
DAMP = 0.3
FEED = 1024  # columns per job of the error feedback's block product (`feed_forward`)
ROUND_ROWS = 1 << 23  # weights per row slice of llama.cpp's rounding (`llama_rounding`)


@dataclass
class Rounding:
    """llama.cpp's quantization of one tensor, opened up: its bytes, the grid its scale bytes allow,
    its codes, and the rule it rounds a weight with (`decide`)."""

    qtype: GGMLType
    data: torch.Tensor  # [rows, row_bytes] uint8: llama.cpp's bytes
    grid: SubGrid
    codes: torch.Tensor  # [rows, n] int16: llama.cpp's codes (every type's fit; a quarter of int64)
    kind: str  # the rounding rule, see `decide`
    iscale: torch.Tensor | None  # [rows, n/sub] float32 multiplier of the rule (mul/roundf/floor/iq4 kinds)
    offset: torch.Tensor | None  # [rows, n/sub] subtracted before scaling (floor kind: the ref Q4_1 min)
    keep: torch.Tensor  # [rows, n/sub] bool: sub-blocks whose codes stay llama's (zero scale)
    inexact: int = 0  # sub-blocks whose rule is the nearest stored value, not llama's (Q4_1/Q5_1 impl)

    @property
    def sub(self) -> int:
        return SUB[self.qtype]

    def decide(self, x: torch.Tensor, col: int | None = None) -> torch.Tensor:
        """Codes for values x: [rows] of column `col`, or [rows, n] (all columns) with col None."""
        lo, hi = RANGE[self.qtype]
        whole = col is None
        sub = self.sub
        s = None if whole else col // sub

        def p(t):  # a per-sub-block parameter, broadcast to x
            if t is None:
                return None
            return t.repeat_interleave(sub, dim=1) if whole else t[:, s]

        k = self.kind
        if k == "div":  # K-quants, Q6_K: nearest_int((x + dm)/d) against the stored scales
            v = x if self.grid.B is None else x - p(self.grid.B)
            q = nearest_int(div(v, p(self.grid.A))) + (self.qtype in (T.Q3_K, T.Q6_K)) * (hi + 1) // 2
        elif k == "mul":  # Q4_0/Q5_0 impl: round(x * iscale) in -nmax..nmax-1, + nmax
            half = (hi + 1) // 2
            q = torch.round(x * p(self.iscale)).clamp_(-half, half - 1).long() + half
        elif k == "roundf":  # Q8_0
            q = roundf(x * p(self.iscale)).clamp_(lo, hi).long()
        elif k == "floor":  # ref Q4_0/Q5_0 (x*inv + half + 0.5) and ref Q4_1/Q5_1 ((x - min)*inv + 0.5)
            off = p(self.offset)
            add = 0.5 if off is not None else (hi + 1) // 2 + 0.5
            v = x if off is None else x - off
            q = torch.floor((v * p(self.iscale) + add).clamp_(lo, hi + 1.0)).long()
        elif k == "iq4":
            q = best_index(x * p(self.iscale), kvalues(x.device))
        else:  # "nearest": the nearest stored value of a uniform grid (Q4_1/Q5_1 impl)
            q = nearest_int(div(x - p(self.grid.B), p(self.grid.A)))
        q = q.clamp_(lo, hi)
        old = self.codes if whole else self.codes[:, col]  # any code of a kept sub-block decodes alike
        return torch.where(p(self.keep), old, q)


def _columns(x: torch.Tensor, sub: int) -> torch.Tensor:
    """[rows, n] -> [sub, rows*n/sub]: one column per sub-block (row-major order)."""
    return x.reshape(-1, sub).T.contiguous()


def _per_sub(v: torch.Tensor, rows: int) -> torch.Tensor:
    return v.reshape(rows, -1)


def _iq4_weights(x: torch.Tensor, qw: torch.Tensor | None, sbs: int) -> torch.Tensor:
    """quantize_row_iq4_nl_impl's weights per 32: qw*sqrt(sigma2 + x²), sigma2 = 2Σx²/sbs over the
    (super-)block, or x² without an imatrix; as [32, sub-blocks]."""
    xs = _columns(x, 32)
    if qw is None:
        return xs * xs
    xt = x.reshape(-1, sbs).T.contiguous()
    sigma2 = seq_sum(xt * xt) * float(2.0 / sbs)
    return _columns(qw, 32) * sqrt(sigma2.repeat_interleave(sbs // 32) + xs * xs)


def _qx_candidates(nmax: int) -> list[float]:
    """make_qx_quants' iscale numerators in its order: -nmax, then -(nmax + 0.1*is), is = -9..9, is != 0."""
    steps = [s for s in range(-9, 10) if s != 0]
    return [float(-nmax)] + [float(-(np.float32(nmax) + np.float32(0.1) * np.float32(s))) for s in steps]


def _recover_qx_iscale(x: torch.Tensor, codes: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The iscale make_qx_quants rounded each 32-block with: the first candidate whose codes equal
    llama's. x, codes [nb, 32] -> (iscale [nb], found [nb] bool). Each candidate is tried on the
    blocks no earlier one matched."""
    _, mx = first_abs_max(x.T.contiguous())
    iscale = torch.zeros(x.shape[0])
    found = torch.zeros(x.shape[0], dtype=torch.bool)
    target = codes.float() - nmax
    todo = torch.arange(x.shape[0])
    for c in _qx_candidates(nmax):
        cand = div(c, mx[todo])
        q = torch.round(x[todo] * cand[:, None]).clamp_(-nmax, nmax - 1)
        hit = (q == target[todo]).all(dim=1)
        iscale[todo[hit]] = cand[hit]
        found[todo[hit]] = True
        todo = todo[~hit]
        if todo.numel() == 0:
            break
    return iscale, found


def llama_rounding(W: torch.Tensor, qtype: GGMLType | str, imatrix: torch.Tensor | None) -> Rounding:
    """llama.cpp's quantization of W [rows, n] (float32 of bf16 values, as llama-quantize reads a bf16
    GGUF) with `imatrix` [n] (or None), opened up for rounding with error feedback.

    A slice of `ROUND_ROWS` weights' rows at a time: every step is row-local (llama.cpp quantizes rows
    independently), so the slices give the whole tensor's result, and the search's temporaries (several
    per weight) stay those of a slice: 2.3 GB above the rest on 31B's down_proj whole (RESULTS.md §11,
    thirteenth round)."""
    qtype = GGMLType[qtype.upper()] if isinstance(qtype, str) else GGMLType(qtype)
    if qtype not in SCALAR_TYPES:
        raise GemmaQuantError(f"error-feedback rounding supports {', '.join(t.name for t in SCALAR_TYPES)}; "
                              f"not {qtype.name}")
    W = W.float()
    rows, n = W.shape
    step = max(1, ROUND_ROWS // n)
    if rows <= step:
        return _rounding(W, qtype, imatrix)
    parts = [_rounding(W[r:r + step], qtype, imatrix) for r in range(0, rows, step)]

    def cat(get):
        got = [get(p) for p in parts]
        return None if got[0] is None else torch.cat(got)

    f = parts[0]
    grid = SubGrid(qtype, cat(lambda p: p.grid.A), cat(lambda p: p.grid.B))
    return Rounding(qtype, cat(lambda p: p.data), grid, cat(lambda p: p.codes), f.kind, cat(lambda p: p.iscale),
                    cat(lambda p: p.offset), cat(lambda p: p.keep), sum(p.inexact for p in parts))


def _rounding(W: torch.Tensor, qtype: GGMLType, imatrix: torch.Tensor | None) -> Rounding:
    rows, n = W.shape
    data = quantize(W, qtype, imatrix)
    grid = sub_grid(data, qtype, rows)
    codes = unpack_codes(data, qtype, rows)
    sub = SUB[qtype]
    nb = rows * n // sub
    blocks = W.reshape(nb, sub)
    kind, iscale, offset, inexact = "div", None, None, 0
    keep = grid.A == 0
    if qtype == T.Q8_0:
        d = div(blocks.abs().amax(dim=1), 127.0)
        kind, iscale = "roundf", torch.where(d != 0, div(1.0, d), 0.0)
    elif qtype in (T.IQ4_NL, T.IQ4_XS):
        kind = "iq4"
        qw = None if imatrix is None else imatrix.float().reshape(1, n).expand(rows, n)
        sbs = 32 if qtype == T.IQ4_NL else 256
        scales = search_scales(_columns(W, 32), _iq4_weights(W, qw, sbs), kvalues())  # [nb] float32
        if qtype == T.IQ4_NL:
            iscale = torch.where(scales != 0, div(1.0, scales), 0.0)
        else:
            per = scales.view(-1, 8).T
            _, max_scale = first_abs_max(per)
            d = div(-max_scale, 32.0)
            dinv = torch.where(d != 0, div(1.0, d), 0.0)
            l = nearest_int(dinv * per).clamp_(-32, 31)
            dl = (d * l.float()).T.reshape(-1)
            iscale = torch.where(dl != 0, div(1.0, dl), 0.0)
        keep = torch.zeros_like(keep)  # ggml re-derives every code, zero scale included
    elif qtype in (T.Q4_0, T.Q5_0):
        nmax = 8 if qtype == T.Q4_0 else 16
        if imatrix is None:
            _, mx = first_abs_max(blocks.T.contiguous())
            d = div(mx, float(-nmax))
            kind, iscale = "floor", torch.where(d != 0, div(1.0, d), 0.0)
        else:
            kind = "mul"
            iscale, found = _recover_qx_iscale(blocks, codes.reshape(nb, sub), nmax)
            amax = blocks.abs().amax(dim=1)
            keep = keep | (amax < GROUP_MAX_EPS).view(rows, -1)
            if bool((~found & ~keep.reshape(-1)).any()):  # cannot happen with llama's own codes
                raise GemmaQuantError(f"{qtype.name}: llama.cpp's codes match no scale candidate (internal error)")
    elif qtype in (T.Q4_1, T.Q5_1):
        nmax = 15 if qtype == T.Q4_1 else 31
        if imatrix is None:
            mn, mx = running_min_max(blocks.T.contiguous())
            d = div(mx - mn, float(nmax))
            kind, iscale, offset = "floor", torch.where(d != 0, div(1.0, d), 0.0), mn
        else:
            kind, inexact = "nearest", nb
    return Rounding(qtype, data, grid, codes.to(torch.int16), kind,
                    None if iscale is None else _per_sub(iscale, rows),
                    None if offset is None else _per_sub(offset, rows), keep, inexact)


@dataclass
class HessianFactor:
    """What GPTQ needs from H: the column processing order and U, the upper Cholesky factor of
    (H + damping)⁻¹ in that order (float32). Linears that read the same input share one."""

    perm: torch.Tensor  # [n] int64
    U: torch.Tensor | None  # [n, n] float32; None once released
    group: int  # columns decided together (1, or 4 for IQ3_S): act-order moves whole groups

    def release(self) -> None:
        """Drop U (31B's down_proj: 1.85 GB) once its last Linear has its codes: what follows the codes
        (the refit, the losses) needs H, not U. Whoever still holds this factor cannot use it again."""
        self.U = None


def hessian_factor(H: torch.Tensor | Held, *, damp: float = DAMP, act_order: bool = True,
                   group: int = 1) -> HessianFactor:
    """Act-order: groups by decreasing Σ diag(H) (stable), as w4a16 GPTQ orders its columns; inputs never
    seen count with H_jj = 1 (`hessian.inverse_cholesky`). A parked wide H (`spill.Held`) is factored
    from its file's rows, without coming back into memory: the same factor."""
    n = H.shape[0]
    if act_order:
        diag = hessian.seen_diagonal(H.diagonal().double())
        gperm = torch.argsort(diag.view(n // group, group).sum(dim=1), descending=True, stable=True)
        perm = (gperm[:, None] * group + torch.arange(group)).reshape(-1)
    else:
        perm = torch.arange(n)
    if isinstance(H, Held) and n <= hessian.WIDE:  # the float64 steps take H whole
        H = H.get()
    with single_thread():
        U = hessian.inverse_cholesky(H, damp, perm)
    return HessianFactor(perm, U, group)


def gptq_codes(W: torch.Tensor, f: HessianFactor, r: Rounding, *, block_size: int = 128) -> torch.Tensor:
    """Codes [rows, n] int16 for W [rows, n] chosen column by column with error feedback (factor `f` of H)."""
    rows, n = W.shape
    perm, U = f.perm, f.U
    Wt = W.float().T[perm].contiguous()  # [n, rows], processing order: one row per input column
    codes = torch.empty(n, rows, dtype=torch.int16)  # every type's codes fit (31B's down_proj: 0.2 GB, not 0.9)
    cols = perm.tolist()
    sub = r.sub
    with single_thread():
        for i1 in range(0, n, block_size):
            i2 = min(i1 + block_size, n)
            W1 = Wt[i1:i2]  # a view: updated in place
            Err1 = torch.empty_like(W1)
            for i in range(i2 - i1):
                col = cols[i1 + i]
                w = W1[i]
                q = r.decide(w, col)
                codes[i1 + i] = q
                err = (w - r.grid.value(q, col // sub)) / U[i1 + i, i1 + i]
                if i + 1 < i2 - i1:
                    W1[i + 1:] -= U[i1 + i, i1 + i + 1:i2, None] * err[None, :]
                Err1[i] = err
            feed_forward(Wt, U, Err1, i1, i2)
    out = torch.empty_like(codes)
    out[perm] = codes
    del codes
    return out.T.contiguous()


def feed_forward(Wt: torch.Tensor, U: torch.Tensor, Err: torch.Tensor, i1: int, i2: int) -> None:
    """Wt[i2:] −= U[i1:i2, i2:]ᵀ Err: the errors of columns i1..i2 fed to the columns not yet rounded
    (Wt: [n, rows], one row per column in processing order). The product is half of GPTQ's time on a
    wide input; it goes by blocks of `FEED` of those columns, as jobs of `threads.parallel_map` (each
    block's values are the whole product's: MKL sums each over the same 128 terms)."""
    n = Wt.shape[0]

    def block(a):
        b = min(a + FEED, n)
        Wt[a:b] -= U[i1:i2, a:b].T @ Err

    parallel_map(block, range(i2, n, FEED))


def layer_loss(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) = ||X(W − Ŵ)ᵀ||² for H = XᵀX (`hessian.loss`)."""
    return hessian.loss(W, What, H)


@dataclass
class Optimized:
    data: torch.Tensor  # [rows, row_bytes] uint8, llama.cpp's scale bytes and our codes
    values: torch.Tensor  # [rows, n] float32: what the bytes dequantize to
    loss_llama: float  # ||X(W − Ŵ)ᵀ||² of llama.cpp's bytes
    loss: float  # and of ours


def optimize_tensor(W: torch.Tensor, H: torch.Tensor | Held, qtype: GGMLType | str, imatrix: torch.Tensor | None, *,
                    feedback: bool = True, damp: float = DAMP, act_order: bool = True, block_size: int = 128,
                    factor: HessianFactor | None = None, refit: bool = True, release: bool = False) -> Optimized:
    """One tensor: llama.cpp's scales, codes by error feedback (`feedback=False`: llama.cpp's bytes).
    `factor`: `hessian_factor(H, ...)` if already computed (it then overrides damp and act_order);
    `release`: this is its last Linear, `HessianFactor.release` it once the codes are chosen (a factor
    made here is always let go then). H (`spill.Held`) waits in its file, if it has one, while the
    codes are chosen: with a released factor, one n × n matrix is in memory at a time.
    `refit`: then re-solve the blocks' fp16 scale fields for those codes (`ggml_refit.py`).

    If the error feedback does not lower the calibration loss (it always should, but a rank-poor H
    can mislead it), llama.cpp's bytes are kept."""
    W = W.float()
    h = held(H)
    with single_thread():
        r = llama_rounding(W, qtype, imatrix)
    if not feedback:
        codes = r.decide(W)
    else:
        h.park()
        release = release or factor is None
        factor = factor or hessian_factor(h, damp=damp, act_order=act_order)
        codes = gptq_codes(W, factor, r, block_size=block_size)
        if release:
            factor.release()
    H = h.get()
    loss_llama = layer_loss(W, r.grid.values(r.codes), H)  # llama's values are decoded again if kept
    data = pack_codes(r.data, r.qtype, codes)
    if feedback and refit:
        with single_thread():  # bytes independent of --threads
            data, row_loss = refit_with_losses(W, H, data, r.qtype, codes)
        values = sub_grid(data, r.qtype, W.shape[0]).values(codes)
        loss = float(row_loss.sum())  # the refit took each row's loss with its final fields
    else:
        values = r.grid.values(codes)
        loss = layer_loss(W, values, H)
    if feedback and loss >= loss_llama:
        del values
        return Optimized(r.data, r.grid.values(r.codes), loss_llama, loss_llama)
    return Optimized(data, values, loss_llama, loss)
