"""The fast paths of the GGML quantizers (CPU only), in order of preference:

1. native C (`native.py`): Q3_K/Q4_K/Q5_K/Q6_K, IQ4_NL and IQ4_XS whole (with and without an
   imatrix), and the scale searches of Q4_0-Q5_1 (with an imatrix) and Q2_K through `search.COMPILED`,
   built with the system C compiler on first use (Q2_K/Q3_K/IQ4_*: native or plain, never
   torch.compile'd);
2. torch.compile: the scale searches of `search.py` (make_qx_quants, make_qkx2/3, make_qp_quants),
   each traced whole, so that inductor turns every candidate step into one loop over the sub-blocks
   instead of the ~10^4 separate ~1 MB torch ops of the plain path; the block packing around them
   stays plain torch;
3. the plain quantizer (the caller's, when `run` returns None).
Native code is the default wherever a C compiler exists (GEMMAQUANT_NATIVE=0 turns it off; without a
compiler the plain quantizers run quietly); torch.compile only under the compiled dequantizers' switch
(`numerics/compiling.py`: `--compile`, GEMMAQUANT_COMPILE=1), which also makes a missing compiler a warning.

Inductor's bit-exactness rests on three things: its C++ is built with -ffp-contract=off and without
-funsafe-math-optimizations (no FMA contraction, no reassociation, no reciprocal for a division;
pinned below whatever TORCHINDUCTOR_CPP_* says), CPU divisions by constants stay divisions, and the
sequential float32 sums lower to a row-ordered loop (`search.seq_sum`). The native code keeps the same
rules by its flags and by construction (`native.py`). The safety net, for both: the first chunk per
process, type and path (with / without an imatrix) is quantized both ways and the bytes compared; a
difference, a missing compiler or a failed build turns that path off (native: for the type, or for the
process when the library cannot be built) with a `CompiledDequantWarning`, and the next path runs.

Each search is compiled once per process and parameter set (nmax, grid), with the number of
sub-blocks dynamic; inductor's on-disk cache turns later processes' compiles into loads. Worker
processes forked after a search was compiled (or the native library loaded) inherit it; the others
load the library from the cache or compile on their own first use.
"""
from __future__ import annotations

import torch

from gemmaquant.numerics.compiling import DIFFERS, enabled, passed, turn_off, why
from gemmaquant.numerics.ggml import native, search
from gemmaquant.numerics.ggml.registry import kernels
from gemmaquant.numerics.ggml.types import GGMLType

# No FMA contraction and no -funsafe-math-optimizations, whatever the environment says; and one thread
# per kernel (no OpenMP split of any loop, whatever the sub-block count): the writer runs chunks in
# parallel anyway.
OPTIONS = {"cpp.enable_floating_point_contract_flag": "off", "cpp.enable_unsafe_math_opt_flag": False,
           "cpp.threads": 1}
SEARCHES = ("make_qx_quants", "make_qkx", "make_qp_quants")

_searches: dict[str, object] = {}
_off: dict[GGMLType, None] = {}  # types whose compiled path failed (turn_off's table)
_checked: set[tuple[GGMLType, bool]] = set()  # (type, with imatrix) whose bytes passed the bit check
NATIVE_OFF = "all"  # _native_off's key when the native library itself is unavailable
_native_off: dict = {}  # types whose native searches differed (turn_off's table), or NATIVE_OFF
_native_checked: set[tuple[GGMLType, bool]] = set()
TO_INDUCTOR = "the torch.compile'd searches"
# Types that run native (searches, or whole) but were never checked through torch.compile: no inductor
# fallback.
NATIVE_ONLY = {GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS}


class _Table(dict):
    """The compiled searches for one quantizer call, noting whether any ran. `traced`: torch.compile'd
    (their inputs are marked dynamic), False for the native C searches."""

    used = False
    traced = True

    def get(self, name, default=None):
        fn = super().get(name, default)
        if fn is not None:
            self.used = True
        return fn


def _table() -> _Table:
    if not _searches:
        for name in SEARCHES:
            # dynamic=False: the int/float parameters stay constants (one graph per parameter set);
            # the sub-block count is marked dynamic per call (search._compiled).
            _searches[name] = torch.compile(getattr(search, name), fullgraph=True, dynamic=False, options=OPTIONS)
    return _Table(_searches)


def _with(table: dict | None, fn, x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    token = search.COMPILED.set(table)
    try:
        return fn(x, imatrix)
    finally:
        search.COMPILED.reset(token)


def _native_table(loud: bool) -> _Table | None:
    """The native searches, or None; `loud`: also warn when there is no C compiler (--compile asked for speed)."""
    if NATIVE_OFF in _native_off or not native.allowed():
        return None
    try:
        table = _Table(native.table())
    except native.NativeError as e:
        if isinstance(e, native.NoCompiler) and not loud:
            _native_off[NATIVE_OFF] = None  # the default path without cc: the plain quantizers, quietly
            return None
        turn_off(_native_off, NATIVE_OFF, "native (C)", str(e), "quantizer searches", TO_INDUCTOR)
        return None
    table.traced = False
    return table


def _run_native(x: torch.Tensor, qtype: GGMLType, imatrix: torch.Tensor | None, k, loud: bool) -> torch.Tensor | None:
    """The chunk's blocks with the native searches, or None (not available, or they failed)."""
    if qtype in _native_off or (table := _native_table(loud)) is None:
        return None
    whole = native.whole(qtype.name, x.shape[1])
    try:
        got = native.quantize_rows(x, qtype.name, imatrix) if whole else _with(table, k.quantize, x, imatrix)
    except Exception as e:  # noqa: BLE001 - any failure falls back to the next path
        turn_off(_native_off, qtype, f"native {qtype.name}", why(e), "quantizer", TO_INDUCTOR)
        return None
    key = (qtype, imatrix is not None)
    if (whole or table.used) and key not in _native_checked:
        if not torch.equal(got, _with(None, k.quantize, x, imatrix)):
            turn_off(_native_off, qtype, f"native {qtype.name}", DIFFERS, "quantizer", TO_INDUCTOR)
            return None
        _native_checked.add(key)
        passed(f"quantize {qtype.name} (native)")
    return got


def prepare() -> None:
    """Build or load the native library now, so that worker processes forked after this inherit it
    (or its failure, warned once here) instead of each building or loading it."""
    _native_table(enabled())


def run(x: torch.Tensor, qtype: GGMLType, imatrix: torch.Tensor | None, inductor: bool = True) -> torch.Tensor | None:
    """The chunk's blocks with the native searches, else (`inductor`) the torch.compile'd ones, or None
    where neither applies or both failed (the caller then runs the plain quantizer)."""
    k = kernels(qtype)
    if x.is_cuda or not (k.compiled_search or qtype in NATIVE_ONLY):
        return None
    if (got := _run_native(x, qtype, imatrix, k, loud=inductor)) is not None:
        return got
    if not inductor or qtype in _off or not k.compiled_search:
        return None
    table = _table()
    name = f"quantize {qtype.name}"  # as compiled_types() lists it
    try:
        got = _with(table, k.quantize, x, imatrix)
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the plain path
        turn_off(_off, qtype, qtype.name, why(e), "quantizer")
        return None
    if not table.used:  # e.g. Q4_0 without an imatrix: no search to compile
        return got
    key = (qtype, imatrix is not None)
    if key not in _checked:
        if not torch.equal(got, _with(None, k.quantize, x, imatrix)):
            turn_off(_off, qtype, qtype.name, DIFFERS, "quantizer")
            return None
        _checked.add(key)
        passed(name)
    return got
