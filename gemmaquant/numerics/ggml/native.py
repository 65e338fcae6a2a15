"""The native quantizers, built on first use with the system C compiler and called through ctypes:
`native/search.c`, a C translation of `search.py`'s make_qx_quants, make_qkx2/3 and make_qp_quants
(the searches of Q4_0-Q5_1 with an imatrix and of Q2_K); and whole quantizers, bytes out:
`native/kquants.c`, `kquants.py`'s Q4_K/Q5_K/Q6_K around those searches; `native/lowk.c`,
`kquants_low.py`'s Q3_K (without an imatrix its own make_q3_quants, with one make_qx_quants);
`native/iq4.c`, `iq4.py`'s IQ4_NL and IQ4_XS (search and packing), with or without an imatrix.
The default GGUF quantizers wherever a C compiler exists (`compiled_quantize.py`; `--compile` adds the
torch.compile'd searches as their fallback).

The C works on tiles of search.py's [P, M] layout and vectorizes across sub-blocks, so each
sub-block's sums still run over its P weights in order from 0.0f: the same float32 values as the plain path, which
is what lets its bytes equal libggml's. The flags forbid what would change a value: no
-ffast-math, -ffp-contract=off (no FMA contraction even where the target has FMA). The target is
the newest x86-64 level (v2, v3 = AVX2, v4 = AVX-512) that this CPU has, read from /proc/cpuinfo
(Linux), else the compiler's default; the level is part of the cached file's name, so a cache
shared between machines never hands one a library built for instructions it lacks. (One thread,
make_qkx2 on 262K values: 6.5 ms baseline, 3.9 ms v3, 2.3 ms v4; RESULTS.md.)
GEMMAQUANT_NATIVE_ISA=baseline|x86-64-v2|x86-64-v3|x86-64-v4 caps it.

The library is cached under the user cache directory (`$XDG_CACHE_HOME` or ~/.cache, then
gemmaquant/native/), named by a hash of the source, the flags, the compiler's path and its
`--version`; it is written to a temporary file and renamed into place, so concurrent processes
(the writer's workers) never load a half-written file. `CC` picks the compiler (default: the first
of Python's sysconfig CC, `cc`, `gcc`, `clang` that exists). No compiler, a failed build or a failed load raise `NativeError`; the
caller warns once and falls back. GEMMAQUANT_NATIVE=0 turns the native path off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from gemmaquant.numerics.ggml import iq4, search

ENV = "GEMMAQUANT_NATIVE"
ISA_ENV = "GEMMAQUANT_NATIVE_ISA"
SOURCE = Path(__file__).with_name("native") / "search.c"
SOURCES = (SOURCE, SOURCE.with_name("kquants.c"), SOURCE.with_name("lowk.c"), SOURCE.with_name("iq4.c"))
HEADERS = (SOURCE.with_name("common.h"),)
FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c99", "-fPIC", "-shared")
# x86-64 micro-architecture levels by the /proc/cpuinfo flags each needs beyond the one before.
LEVELS = (
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)
_F = ctypes.c_void_p  # tensor data pointers
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: NativeError | None = None  # why the library is unavailable in this process
built_isa: str | None = None  # the level of the library loaded (or last built)


class NativeError(RuntimeError):
    """The native searches cannot be built or loaded here."""


class NoCompiler(NativeError):
    """No C compiler to build them with (the plain quantizers run, silently unless --compile asked)."""


def allowed() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> list[str]:
    """The C compiler command: $CC (an error if it is not found), else the first found of Python's own
    build CC (a conda build names one that may not exist here), `cc`, `gcc`, `clang`."""
    if os.environ.get("CC"):
        candidates = [os.environ["CC"]]
    else:
        candidates = [c for c in (sysconfig.get_config_var("CC"), "cc", "gcc", "clang") if c]
    for cmd in candidates:
        parts = shlex.split(cmd)
        if parts and (exe := shutil.which(parts[0])) is not None:
            return [exe, *parts[1:]]
    named = ", ".join(repr(shlex.split(c)[0]) if shlex.split(c) else "''" for c in candidates)
    raise NoCompiler(f"no C compiler: {named} not found (set CC to a C compiler)")


def isa() -> str:
    """The x86-64 level to build for ('baseline' elsewhere or when unknown), capped by $GEMMAQUANT_NATIVE_ISA."""
    names = ["baseline"] + [name for name, _ in LEVELS]
    cap = os.environ.get(ISA_ENV, "").strip() or names[-1]
    if cap not in names:
        raise NativeError(f"{ISA_ENV}={cap!r}: expected one of {', '.join(names)}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "baseline"
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "baseline"
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    level = "baseline"
    for name, needs in LEVELS:
        if not needs <= flags or names.index(name) > names.index(cap):
            break
        level = name
    return level


def flags(level: str) -> tuple[str, ...]:
    return FLAGS if level == "baseline" else (*FLAGS, f"-march={level}")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gemmaquant" / "native"


def _build() -> Path:
    """The library for this CPU's level; a compiler too old for -march=x86-64-vN gets the baseline."""
    cc = compiler()
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeError(f"{cc[0]} --version failed: {e}") from e
    level = isa()
    try:
        return _build_level(cc, version, level)
    except NativeError:
        if level == "baseline":
            raise
        return _build_level(cc, version, "baseline")


def _build_level(cc: list[str], version: str, level: str) -> Path:
    global built_isa
    key = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), " ".join(flags(level)).encode(), " ".join(cc).encode(), version.encode(),
                 platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    out = cache_dir() / f"search-{level}-{key.hexdigest()[:20]}.so"
    built_isa = level
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        res = subprocess.run([*cc, *flags(level), "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            first = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[0]
            raise NativeError(f"building {SOURCE.name} failed: {first}")
        os.replace(tmp, out)  # atomic: another process sees the old name absent or the whole file
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeError(f"building {SOURCE.name} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> ctypes.CDLL:
    path = _build()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeError(f"loading {path.name} failed: {e}") from e
    i64, i32, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.gq_make_qx_quants.argtypes = [_F, _F, i64, i64, i32, _F, i32, _F, _F]
    lib.gq_make_qkx.argtypes = [_F, _F, i64, i64, i32, f32, f32, i32, i32, i32, _F, _F, _F]
    lib.gq_make_qp_quants.argtypes = [_F, _F, i64, i64, i32, _F, _F]
    for fn in (lib.gq_make_qx_quants, lib.gq_make_qkx, lib.gq_make_qp_quants):
        fn.restype = None
    lib.gq_pmax.restype = ctypes.c_int
    lib.gq_quantize_q6_k.argtypes = [_F, _F, i64, i64, _F, i32, _F]
    lib.gq_quantize_q45_k.argtypes = [_F, _F, i64, i64, i32, _F]
    lib.gq_quantize_q3_k.argtypes = [_F, _F, i64, i64, _F, _F, i32, _F]
    lib.gq_quantize_iq4.argtypes = [_F, _F, i64, i64, i32, _F, _F]
    for fn in (lib.gq_quantize_q6_k, lib.gq_quantize_q45_k, lib.gq_quantize_q3_k, lib.gq_quantize_iq4):
        fn.restype = ctypes.c_int
    lib.gq_f32_to_f16.argtypes = [_F, i64, _F]
    lib.gq_f32_to_f16.restype = None
    return lib


def library() -> ctypes.CDLL:
    """The loaded library (built or found in the cache on the first call); NativeError if it cannot be."""
    global _lib, _failed
    if _lib is not None:  # no lock once loaded: a fork while another thread held it would leave it held
        return _lib
    with _lock:
        if _lib is None:
            if _failed is not None:
                raise _failed
            try:
                _lib = _load()
            except (NativeError, OSError) as e:  # OSError: e.g. a cache directory we cannot write
                if isinstance(e, NativeError):
                    _failed = e
                    raise
                _failed = NativeError(f"native library: {e}")
                raise _failed from e
        return _lib


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _plain(name: str, *args):
    """search.py's own function (a sub-block wider than the C tile's PMAX, or a CUDA tensor)."""
    token = search.COMPILED.set(None)
    try:
        return getattr(search, name)(*args)
    finally:
        search.COMPILED.reset(token)


def _fits(lib: ctypes.CDLL, x: torch.Tensor) -> bool:
    return x.dim() == 2 and not x.is_cuda and x.shape[0] <= lib.gq_pmax()


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None):
    lib = library()
    if not _fits(lib, x):
        return _plain("make_qx_quants", x, nmax, qw)
    x = _f32(x)
    qw = None if qw is None else _f32(qw)
    p, m = x.shape
    grid = np.asarray(search.qx_grid(nmax), dtype=np.float32)
    scale = torch.empty(m, dtype=torch.float32)
    L = torch.empty((p, m), dtype=torch.int32)
    lib.gq_make_qx_quants(x.data_ptr(), None if qw is None else qw.data_ptr(), p, m, nmax,
                          grid.ctypes.data, len(grid), scale.data_ptr(), L.data_ptr())
    return scale, L


def make_qkx(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, qkx3: bool,
             use_mad: bool = False):
    lib = library()
    if not _fits(lib, x):
        return _plain("make_qkx", x, w, nmax, rmin, rdelta, nstep, qkx3, use_mad)
    x, w = _f32(x), _f32(w)
    p, m = x.shape
    scale = torch.empty(m, dtype=torch.float32)
    the_min = torch.empty(m, dtype=torch.float32)
    L = torch.empty((p, m), dtype=torch.int32)
    lib.gq_make_qkx(x.data_ptr(), w.data_ptr(), p, m, nmax, rmin, rdelta, nstep, int(qkx3), int(use_mad),
                    scale.data_ptr(), the_min.data_ptr(), L.data_ptr())
    return scale, the_min, L


def make_qp_quants(x: torch.Tensor, w: torch.Tensor, nmax: int):
    lib = library()
    if not _fits(lib, x):
        return _plain("make_qp_quants", x, w, nmax)
    x, w = _f32(x), _f32(w)
    p, m = x.shape
    scale = torch.empty(m, dtype=torch.float32)
    L = torch.empty((p, m), dtype=torch.int32)
    lib.gq_make_qp_quants(x.data_ptr(), w.data_ptr(), p, m, nmax, scale.data_ptr(), L.data_ptr())
    return scale, L


# Whole quantizers in C: `native/kquants.c` (kquants.py's quantize_q45_k / quantize_q6_k), `native/lowk.c`
# (kquants_low.py's quantize_q3_k), `native/iq4.c` (iq4.py's quantize_iq4_nl / quantize_iq4_xs): the torch
# ops around the searches cost three times the native searches themselves, and Q3_K's reference search
# and IQ4's have no native search of their own. By type name: (block size, block bytes).
BLOCK_TYPES = {"Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "Q3_K": (256, 110),
               "IQ4_NL": (32, 18), "IQ4_XS": (256, 136)}


def whole(qtype_name: str, n: int) -> bool:
    """Whether rows of n values of this type quantize whole in C (`quantize_rows`)."""
    return qtype_name in BLOCK_TYPES and n % BLOCK_TYPES[qtype_name][0] == 0


def quantize_rows(x: torch.Tensor, qtype_name: str, imatrix: torch.Tensor | None) -> torch.Tensor:
    """[rows, n] float32 (n a multiple of the block size) -> [rows, row_bytes] uint8 blocks of a
    `BLOCK_TYPES` type."""
    lib = library()
    x = _f32(x)
    rows, n = x.shape
    block, nbytes = BLOCK_TYPES[qtype_name]
    bpr = n // block
    nb = rows * bpr
    out = torch.empty((rows, bpr * nbytes), dtype=torch.uint8)
    im = None if imatrix is None else _f32(imatrix.reshape(-1))
    im_ptr = None if im is None else im.data_ptr()
    if qtype_name == "Q6_K":
        grid = np.asarray(search.qx_grid(32), dtype=np.float32)
        rc = lib.gq_quantize_q6_k(x.data_ptr(), im_ptr, nb, bpr, grid.ctypes.data, len(grid), out.data_ptr())
    elif qtype_name == "Q3_K":
        grid4, grid32 = (np.asarray(search.qx_grid(m), dtype=np.float32) for m in (4, 32))
        rc = lib.gq_quantize_q3_k(x.data_ptr(), im_ptr, nb, bpr, grid4.ctypes.data, grid32.ctypes.data, len(grid4),
                                  out.data_ptr())
    elif qtype_name in ("IQ4_NL", "IQ4_XS"):
        kv = iq4.kvalues()
        rc = lib.gq_quantize_iq4(x.data_ptr(), im_ptr, nb, bpr, block, kv.data_ptr(), out.data_ptr())
    else:
        rc = lib.gq_quantize_q45_k(x.data_ptr(), im_ptr, nb, bpr, 15 if qtype_name == "Q4_K" else 31, out.data_ptr())
    if rc == -2:
        raise NativeError(f"native {qtype_name} quantizer: its level table is not gguf's kvalues")
    if rc != 0:
        raise MemoryError(f"native {qtype_name} quantizer: out of memory for {nb} blocks")
    return out


def f32_to_f16_bits(x: torch.Tensor) -> torch.Tensor:
    """The C quantizers' float -> half conversion, as int16 bits (for the tests)."""
    x = _f32(x).reshape(-1)
    out = torch.empty(x.numel(), dtype=torch.int16)
    library().gq_f32_to_f16(x.data_ptr(), x.numel(), out.data_ptr())
    return out


def table() -> dict:
    """The native searches by search.py name (for `search.COMPILED`); builds the library first, so
    that a missing compiler raises NativeError here, not inside a quantizer."""
    library()
    return {"make_qx_quants": make_qx_quants, "make_qkx": make_qkx, "make_qp_quants": make_qp_quants}
