"""Pieces of the sensitivity pass (sensitivity.py) that Gemma 4's layouts need.

* `Stream`: one residual stream of the pass, with the state Gemma 4 layers read beside it: per
  mini-batch the K/V that KV-shared layers take from an earlier layer, and the per-layer inputs (PLE)
  of its own embedding (a stream started by a quantized token or per-layer table reads those).
* `ExpertInputs`: the tokens the router really sends to each expert of a MoE layer (the fused gate/up
  input and the down input before the routing weight, as `Experts.observer` reports them).
* `expert_error`: a fused [E, rows, n] expert tensor's layer-output error at a type (and what llama.cpp's
  CPU rounding of its inputs adds), summed over experts
  on their own routed inputs (each expert quantized with its own importance, as llama-imatrix records
  MUL_MAT_ID inputs per expert).
* `Switch`: a resident tensor switched to the reference type and back, holding only that type's bytes
  (the resident layer stays in the stored dtype, `load_layer(stored=True)`: nothing of the size of a
  big tensor is ever held in float32, issue 19 §4's 3 GiB on the 26B-A4B and 31B shapes).
* `InputForms`: each Linear input's XᵀX, or X itself where that is the smaller, and what llama.cpp's
  CPU rounding of it to 8 bits adds.
* `Head`: the LM head's KL, the table streamed in row chunks (the types scored on a sample of a big
  table's rows, `head_sample`).
"""

from __future__ import annotations

import math
from functools import partial

import torch

from ..formats.safetensors import release_pages
from ..model.qlinear import act_block, ggml_act_quant
from ..numerics.ggml.dequantize import dequantize
from ..numerics.ggml.quantize import quantize
from ..numerics.ggml.types import GGMLType
from .ggml_calibrate import imatrix_of
from .hessian import quad_form
from .threads import single_thread


def quantized(W: torch.Tensor, t: GGMLType, imatrix: torch.Tensor | None) -> torch.Tensor:
    """W [rows, n] as llama.cpp's bytes of type t decode (single-threaded: bit-exact every run)."""
    with single_thread():
        return dequantize(quantize(W, t, imatrix), t, tuple(W.shape))


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere). The
    pass's per-expert temporaries (a few MB each, under glibc's adaptive mmap threshold) come from the
    heap, interleaved with the Q4_0 bytes it keeps, and their freed pages otherwise stay resident: the
    heap of a 26B-A4B MoE layer's pass reached 1.45 GB with far less of it in use."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def sampled_rows(n: int, max_rows: int) -> torch.Tensor:
    step = max(1, math.ceil(n / max_rows))
    return torch.arange(0, n, step)


class Stream:
    """A residual stream [n, S, H] and what its layers read beside it (module doc)."""

    def __init__(self, h: torch.Tensor, ple=None, kv: dict | None = None):
        self.h, self.ple = h, ple
        self.kv: dict[int, dict] = kv if kv is not None else {}  # mini-batch start -> {layer: (K, V)}

    def kv_copy(self) -> dict[int, dict]:
        """Per mini-batch copies of the K/V kept so far: a trial run may overwrite its producer's entry."""
        return {b: dict(d) for b, d in self.kv.items()}


def run_layer(layer, index: int, stream: Stream, ctx, batch_size: int, h: torch.Tensor | None = None,
              kv: dict | None = None) -> torch.Tensor:
    """The layer's output on `h` (default: the stream's), with the stream's per-layer inputs and the K/V
    in `kv` (default: the stream's own, which a producer layer updates)."""
    h = stream.h if h is None else h
    kv = stream.kv if kv is None else kv
    out = torch.empty_like(h)
    cur = stream.ple.layer(index) if stream.ple is not None else None
    for b in range(0, h.shape[0], batch_size):
        ctx.kv = kv.setdefault(b, {})
        if cur is not None:
            ctx.per_layer = stream.ple.batch(*cur, b, b + batch_size)
            ctx.per_layer_first = index
        out[b:b + batch_size] = layer(h[b:b + batch_size], ctx)
    return out


class ExpertInputs:
    """Routed inputs of every expert of one layer, kept while the layer's float pass runs."""

    def __init__(self, experts):
        self.experts = experts
        self.x: dict[str, list[list[torch.Tensor]]] = {w: [[] for _ in range(experts.num_experts)]
                                                       for w in ("gate_up", "down")}
        experts.observer = lambda e, which, x: self.x[which][e].append(x.detach().float())

    def remove(self) -> None:
        self.experts.observer = None

    def of(self, which: str) -> list[torch.Tensor | None]:
        """Per expert its routed inputs [tokens, n] (None: the router sent it no calibration token)."""
        return [torch.cat(xs) if xs else None for xs in self.x[which]]


def expert_imatrix(X: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Per expert llama-quantize's importance Σx²/count from its routed tokens (None: no token)."""
    return [None if x is None else imatrix_of(x.double().pow(2).sum(0), x.shape[0]) for x in X]


def bf16_rows(W: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of a resident weight as llama-quantize reads them from the converter's bf16 GGUF."""
    return W[rows].detach().to(torch.bfloat16).float()


def expert_error(W: torch.Tensor, X: list[torch.Tensor | None], imat: list, t: GGMLType, max_rows: int,
                 activations: bool = False) -> tuple[float, float]:
    """(Σ_e ||X_e (W_e − Ŵ_e)ᵀ||², and with `activations` Σ_e ||(q8(X_e) − X_e) Ŵ_eᵀ||²: llama.cpp's CPU
    rounding of each expert's input for type t, exactly) over the experts that saw tokens (an expert no
    token reaches adds no error on this text), on up to `max_rows` evenly spaced rows per expert,
    scaled to all rows."""
    total = act = 0.0
    rows = sampled_rows(W.shape[1], max_rows)
    scale = W.shape[1] / len(rows)
    for e, x in enumerate(X):
        if x is None:
            continue
        Ws = bf16_rows(W[e], rows)
        Wq = quantized(Ws, t, imat[e])
        total += float((x.double() @ (Ws - Wq).double().T).pow(2).sum()) * scale
        if activations and act_block(t) is not None:
            act += float(((ggml_act_quant(x, t) - x).double() @ Wq.double().T).pow(2).sum()) * scale
    trim_heap()
    return total, act


class Switch:
    """One measured tensor of the resident layer, switched between its stored value and its value at
    type t, holding only that type's bytes (Q4_0: 0.56 bytes a weight) and no float copy of the tensor.

    A Linear (`load_layer(stored=True)`: a `DenseLinear`) is swapped for a `GGMLLinear` of those bytes,
    which dequantizes where used; a fused [E, rows, n] expert tensor gets a stand-in per expert
    (`Experts.standin`) for the experts that saw tokens (`seen`), each quantized with its own
    importance and dequantized when its expert runs; the others cannot change the output on this text.
    The values are llama.cpp's decoding of the bytes of the bf16-rounded weight, as llama-quantize
    quantizes the converter's bf16 GGUF."""

    def __init__(self, layer, path: str, t: GGMLType, imatrix, seen=None):
        self.t = t
        parent, _, self.child = path.rpartition(".")
        self.parent = layer.get_submodule(parent) if parent else layer
        with single_thread():
            if seen is None:  # a Linear: quantized a row chunk at a time (row-local, so the same bytes)
                self.module = getattr(self.parent, self.child)
                W = self.module.weight
                step = max(1, (1 << 22) // W.shape[1])
                self.data = torch.cat([quantize(W[r:r + step].to(torch.bfloat16).float(), t, imatrix)
                                       for r in range(0, W.shape[0], step)])
            else:
                W = getattr(self.parent, self.child)
                self.which, self.shape = self.child.removesuffix("_proj"), tuple(W.shape[1:])
                self.data = {}
                for e in range(W.shape[0]):
                    if seen[e]:
                        self.data[e] = quantize(W[e].to(torch.bfloat16).float(), t, imatrix[e])
                        trim_heap()  # each expert's temporaries, between the bytes kept

    def reference(self) -> None:
        if isinstance(self.data, dict):
            trials = self.parent.standin
            if trials is None:
                trials = self.parent.standin = Trials()
            trials.active[self.which] = self
        else:
            from ..model.qlinear import GGMLLinear

            out, n = self.module.weight.shape
            setattr(self.parent, self.child, GGMLLinear(self.data, self.t, out, n))

    def restore(self) -> None:
        if isinstance(self.data, dict):
            trials = self.parent.standin
            trials.active.pop(self.which, None)
            if not trials.active:
                self.parent.standin = None
        else:
            setattr(self.parent, self.child, self.module)

    def expert(self, e: int) -> torch.Tensor | None:
        if e not in self.data:
            return None
        with single_thread():
            return dequantize(self.data[e], self.t, self.shape)


class Trials:
    """`Experts.standin` while some of the layer's fused tensors are switched: {"gate_up"/"down": Switch}."""

    def __init__(self):
        self.active: dict[str, Switch] = {}

    def __call__(self, which: str, e: int) -> torch.Tensor | None:
        sw = self.active.get(which)
        return None if sw is None else sw.expert(e)


class InputForms:
    """Per hooked Linear input of a layer, the quadratic form of its layer-output error
    e = ||X Dᵀ||² = tr(D XᵀX Dᵀ) (D: a weight error, X: the input over the calibration tokens): XᵀX
    accumulated in float32 as `stats.InputStats` does, or X itself where that is smaller and XᵀX is
    big (over WIDE channels: 31B's down_proj input has 21504, whose XᵀX takes 1.85 GB, 512 tokens of X
    44 MB). Both give the same e up to float rounding; inputs of up to WIDE channels (every input of
    Gemma 3 270M and of the test models) take exactly the former XᵀX path. A wide H's forms are float32
    products on its column blocks, summed in float64 (no float64 copy of it: `hessian.quad_form`).

    With `activations`, also llama.cpp's CPU rounding of the same inputs to 8 bits (`qlinear.act_block`:
    blocks of 32 for the 32-weight types, 256 for the K- and IQ-quants): per channel j, N_j = Σ_t r_tj²
    of its rounding error r. The product then adds ≈ Σ_j N_j ||Ŵ_:,j||² to e (`act_error`): r is nearly
    independent of x and across channels, so the cross terms average out. That is what makes a Q6_K
    ffn_down (its GeGLU input rounded in blocks of 256) cost more on a CPU than its weights alone.

    With `split`, the calibration windows are also kept in two halves (even windows: `fit`, odd:
    `held`; one window: its first and second half of positions), for scoring error-feedback codes
    fitted on one half on the other (`hessian`, `error(..., part=)`): on the few tokens of this pass,
    codes look far better on their own fitting tokens than on others (RESULTS.md §11, tenth round).
    The whole input's XᵀX is then not kept: its form is the sum of the halves'."""

    BLOCK = 1 << 23  # float64 values of X's rows at a time: 64 MB
    WIDE = 4096

    ROWS = 512  # tokens rounded at a time (31B's 21504-wide down input: 44 MB per copy)

    def __init__(self, layer, tokens: int, activations: bool = False, split: bool = False):
        from .stats import input_groups

        self.groups = input_groups(layer)
        self.xtx: dict[str, torch.Tensor] = {}
        self.x: dict[str, list[torch.Tensor]] = {}
        self.act: dict[str, dict[int, torch.Tensor]] = {}  # src -> {block: N [n] float64}
        self.split, self.tokens = split, tokens
        self.parts: dict[str, dict[str, torch.Tensor]] = {}  # src -> {"fit"|"held": XᵀX}, XᵀX path
        self.held: dict[str, list[torch.Tensor]] = {}  # src -> per kept X chunk, its rows in `held`
        self.fit_rows: dict[str, int] = {}  # src -> kept X's first rows that are the `fit` half (remove())
        self.windows: dict[str, int] = {}  # src -> windows seen (the split goes by window)
        self.grams: dict[tuple, torch.Tensor] = {}  # (src, part) -> XᵀX made from kept rows
        self.handles = []
        for src in sorted(set(self.groups.values())):
            mod = layer.get_submodule(src)
            n = mod.weight.shape[1]
            if activations:
                self.act[src] = {b: torch.zeros(n, dtype=torch.float64) for b in (32, 256) if n % b == 0}
            if n <= max(tokens, self.WIDE):
                self.handles.append(mod.register_forward_pre_hook(partial(self._gram, src)))
            else:
                self.x[src] = []
                self.handles.append(mod.register_forward_pre_hook(partial(self._keep, src)))

    def _held_rows(self, src: str, shape: torch.Size) -> torch.Tensor:
        """Which tokens of a batch [b, S, n] (or [S, n]) go to the `held` half: the odd windows, or
        the second half of the positions when the pass has one window."""
        b, S = (shape[0], shape[1]) if len(shape) == 3 else (1, shape[0])
        first = self.windows.get(src, 0)
        self.windows[src] = first + b
        if self.tokens <= S:  # one window: split its positions
            return (torch.arange(S) >= S // 2).repeat(b)
        return ((torch.arange(b) + first) % 2 == 1).repeat_interleave(S)

    def _keep(self, src: str, _m, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.x[src].append(x)
        if self.split:
            self.held.setdefault(src, []).append(self._held_rows(src, args[0].shape))
        self._round(src, x)

    def _gram(self, src: str, _m, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if self.split:  # the whole XᵀX is the halves' sum: not kept (31B's down_proj: 1.85 GB each)
            held = self._held_rows(src, args[0].shape)
            acc = self.parts.setdefault(src, {})
            for part, rows in (("fit", x[~held]), ("held", x[held])):
                p = rows.T @ rows
                acc[part] = p if part not in acc else acc[part].add_(p)
        else:
            p = x.T @ x
            self.xtx[src] = p if src not in self.xtx else self.xtx[src].add_(p)
        self._round(src, x)

    def _round(self, src: str, x: torch.Tensor) -> None:
        for block, acc in self.act.get(src, {}).items():
            qtype = GGMLType.Q8_0 if block == 32 else GGMLType.Q6_K  # any weight type of that block
            for r in range(0, x.shape[0], self.ROWS):
                xs = x[r:r + self.ROWS]
                acc.add_((ggml_act_quant(xs, qtype) - xs).double().pow(2).sum(0))

    def act_error(self, suffix: str, Wq: torch.Tensor, qtype: GGMLType) -> float:
        """Σ_j N_j ||Wq_:,j||²: what rounding this Linear's input as llama.cpp's CPU backend does for
        weights of `qtype` adds to its layer-output error (Wq [rows, n]: the quantized weights); 0
        without `activations`."""
        block = act_block(qtype)
        acc = self.act.get(self.groups[suffix], {})
        if block not in acc:
            return 0.0
        return float((Wq.double().pow(2).sum(0) * acc[block]).sum())

    def remove(self) -> None:
        """Stop recording. A kept X becomes one tensor, with `split` its `fit` rows first (each half
        then a view of it)."""
        for h in self.handles:
            h.remove()
        for src, chunks in self.x.items():
            if not self.split:
                self.x[src] = [torch.cat(chunks)]
                continue
            masks = self.held.pop(src)
            k = sum(int((~m).sum()) for m in masks)
            X = torch.empty(sum(c.shape[0] for c in chunks), chunks[0].shape[1], dtype=chunks[0].dtype)
            at = [0, k]  # next free row of the fit and the held half
            while chunks:  # one copy: each chunk is freed once placed
                c, m = chunks.pop(0), masks.pop(0)
                for half, rows in enumerate((c[~m], c[m])):
                    X[at[half]:at[half] + rows.shape[0]] = rows
                    at[half] += rows.shape[0]
            self.x[src], self.fit_rows[src] = [X], k

    def _rows(self, src: str, part: str | None) -> torch.Tensor:
        X = self.x[src][0]
        if part is None:
            return X
        k = self.fit_rows[src]
        return X[k:] if part == "held" else X[:k]

    def hessian(self, suffix: str, part: str | None = None) -> torch.Tensor:
        """XᵀX (float32) of the Linear `suffix`'s input: all tokens, or one half (`split`)."""
        src = self.groups[suffix]
        if src in self.x:  # made once per input and half: every candidate type of every reader uses it
            if (src, part) not in self.grams:
                X = self._rows(src, part)
                self.grams[(src, part)] = X.T @ X
            return self.grams[(src, part)]
        if part is None and self.split:
            return self.parts[src]["fit"] + self.parts[src]["held"]
        return self.xtx[src] if part is None else self.parts[src][part]

    def error(self, suffix: str, D: torch.Tensor, part: str | None = None) -> float:
        """||X Dᵀ||² for the Linear `suffix`, D [rows, n] float64; X: all tokens, or one half (`split`)."""
        src = self.groups[suffix]
        if src in self.x:
            X = self._rows(src, part)
            step = max(1, self.BLOCK // X.shape[1])
            return float(sum((X[r:r + step].double() @ D.T).pow(2).sum() for r in range(0, X.shape[0], step)))
        if part is None and self.split:  # the halves' sum: the whole XᵀX is not kept
            return self.error(suffix, D, "fit") + self.error(suffix, D, "held")
        return quad_form(D, self.xtx[src] if part is None else self.parts[src][part])


class Head:
    """The final norm and the LM head (tied: the embedding), with the final soft-cap: the KL from the
    float logits over the `pos` positions of each window, of perturbed final states through the float
    table and of the float final states through the table at each GGML type.

    The table streams in chunks of `rows` vocabulary rows read from the checkpoint's mapping (Gemma 4
    31B's 262144 × 5376 table would be 5.6 GB in float32, and as much again quantized), each chunk's
    pages dropped once used. Per position, with a the float logits and b the other ones, KL =
    Σ_v p_v (a_v − b_v) − lse(a) + lse(b) (p = softmax(a)): lse(a) in a first pass over the table, the
    rest accumulated chunk by chunk. The perturbed streams are always measured on every row.

    With `activations`, the final states through the table at type t are rounded first as llama.cpp's
    CPU backend rounds them for t (`qlinear.ggml_act_quant`): the head's KL per type is then exactly
    the one llama.cpp's CPU product has, on these states.

    The types: llama.cpp quantizes the table row by row, without importance. A table of at most
    `max_rows` rows is quantized whole at each type. A bigger one (Gemma 3/4's 262144 rows: 11 types
    took over half an hour with our quantizers on 26B-A4B's 2816 columns) is scored on `max_rows` of
    its rows, `head_sample`: the quarter that carries the most probability on these positions, all
    of them, and the rest evenly spaced, each standing for its share of the unsampled rows. With
    δ = b − a on the quantized rows, KL = log Σ_v p_v e^{δ_v} − Σ_v p_v δ_v exactly, which is the sum
    over rows of p_v (e^{δ_v} − 1 − δ_v) plus log(1 + s) − s, s = Σ_v p_v (e^{δ_v} − 1): both sums
    are over rows and are estimated from the sample (benchmarks/head_sampling.py measures the
    estimate against the whole table on the demo model: RESULTS.md §10)."""

    def __init__(self, ckpt, pos: torch.Tensor, rows: int = 4096, max_rows: int = 16384, activations: bool = False):
        from ..model.gemma import RMSNorm

        cfg = ckpt.config
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset).requires_grad_(False)
        with torch.no_grad():
            self.norm.weight.copy_(ckpt.tensor("model.norm.weight").float())
        self.tied = "lm_head.weight" not in ckpt.names()
        self.W = ckpt.tensor("model.embed_tokens.weight" if self.tied else "lm_head.weight")  # stored dtype
        self.cap = cfg.final_logit_softcapping
        self.pos, self.rows, self.max_rows = pos, rows, max_rows
        self.activations = activations

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h[:, self.pos].reshape(-1, h.shape[-1]))

    def _rounded(self, x: torch.Tensor, t: GGMLType) -> torch.Tensor:
        """The final states as llama.cpp's CPU backend feeds them to a table of type t (`activations`)."""
        return ggml_act_quant(x, t) if self.activations else x

    def _logits(self, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.linear(x, W)
        if self.cap is not None:
            z = torch.tanh(z / self.cap) * self.cap
        return z.double()

    def _chunk(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) in float32, their pages of the mapping dropped (the whole table would stay
        resident otherwise: 1.5 GB on 26B-A4B, 2.8 GB on 31B)."""
        view = self.W[r0:r1]
        out = view.float()
        release_pages(view)
        return out

    def kls(self, h_ref: torch.Tensor, streams: list[torch.Tensor], types) -> tuple[list[float], dict]:
        """(mean KL of each perturbed final state [n, S, H] through the float table, {type: mean KL of
        the float final states through the table at that type})."""
        x = self._final(h_ref)
        xs = [self._final(h) for h in streams]
        types = list(types)
        V = self.W.shape[0]
        sample = V > self.max_rows
        chunks = [(r, min(r + self.rows, V)) for r in range(0, V, self.rows)]
        lse_a = torch.full((x.shape[0],), float("-inf"), dtype=torch.float64)
        for r0, r1 in chunks:
            lse_a = torch.logaddexp(lse_a, self._logits(x, self._chunk(r0, r1)).logsumexp(-1))
        k = len(xs) + (0 if sample else len(types))
        acc = torch.zeros(k, x.shape[0], dtype=torch.float64)
        lse_b = torch.full((k, x.shape[0]), float("-inf"), dtype=torch.float64)
        mass = torch.zeros(V, dtype=torch.float64)
        for r0, r1 in chunks:
            Wc = self._chunk(r0, r1)
            a = self._logits(x, Wc)
            p = (a - lse_a[:, None]).exp()
            mass[r0:r1] = p.sum(0)
            for j in range(k):
                b = self._logits(xs[j], Wc) if j < len(xs) else \
                    self._logits(self._rounded(x, types[j - len(xs)]), quantized(Wc, types[j - len(xs)], None))
                acc[j] += (p * (a - b)).sum(-1)
                lse_b[j] = torch.logaddexp(lse_b[j], b.logsumexp(-1))
        kl = (acc - lse_a + lse_b).mean(-1).tolist()
        if not sample:
            return kl[:len(xs)], dict(zip(types, kl[len(xs):]))
        return kl, self._sampled(x, lse_a, mass, types)

    def _sampled(self, x: torch.Tensor, lse_a: torch.Tensor, mass: torch.Tensor, types) -> dict:
        """{type: mean KL} of the table at each type, estimated on `head_sample`'s rows (class doc)."""
        rows, weight = head_sample(mass, self.max_rows)
        tail = torch.zeros(len(types), x.shape[0], dtype=torch.float64)  # Σ w p (e^δ − 1 − δ)
        s = torch.zeros(len(types), x.shape[0], dtype=torch.float64)  # Σ w p (e^δ − 1)
        for c in range(0, len(rows), self.rows):
            idx = rows[c:c + self.rows]
            view = self.W[int(idx[0]):int(idx[-1]) + 1]
            Wc = view[idx - idx[0]].float()
            release_pages(view)
            a = self._logits(x, Wc)
            pw = (a - lse_a[:, None]).exp() * weight[c:c + self.rows]
            for j, t in enumerate(types):
                d = self._logits(self._rounded(x, t), quantized(Wc, t, None)) - a
                e = torch.expm1(d)
                tail[j] += (pw * (e - d)).sum(-1)
                s[j] += (pw * e).sum(-1)
        kl = (tail + torch.log1p(s) - s).mean(-1).tolist()
        return dict(zip(types, kl))


def head_sample(mass: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows ascending, weights [float64]) of a sample of at most `n` of a table's rows to score the
    LM head's types on: the n // 4 rows of most probability mass `mass` [V] (weight 1) and evenly
    spaced ones of the others (weight: the others' count over those sampled), so that a weighted sum
    over the sample estimates the sum over all rows."""
    V = mass.numel()
    top = mass.topk(min(V, n // 4)).indices
    rest = torch.ones(V, dtype=torch.bool)
    rest[top] = False
    rest = rest.nonzero().squeeze(1)
    weight = torch.zeros(V, dtype=torch.float64)
    weight[top] = 1.0
    if len(rest):
        pick = rest[sampled_rows(len(rest), n - len(top))]
        weight[pick] = len(rest) / len(pick)
    rows = weight.nonzero().squeeze(1)
    return rows, weight[rows]
