"""The GGUF header (every key and tensor info, then padding), built in the background while the
tensors are quantized. No torch here: the job is started before torch's import.

For a Gemma 3 checkpoint the header is mostly the 262k-entry vocabulary, seconds of single-threaded
Python (tokenizer.model decoded, the 33 MB tokenizer.json parsed by the `gguf` package's
SpecialVocab, the arrays packed), a large part of a small model's whole HF → Q6_K run
(benchmarks/RESULTS.md §8). `HeaderJob` builds
it in a separate process (a fresh interpreter: no fork of a threaded parent), so it runs on the
other core while the parent imports torch and starts quantizing; the writer keeps the first slabs
in memory until the header bytes arrive (`writer.write_gguf`). The bytes are those of the inline
build (`build_header`); tests compare whole files both ways.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from ...formats.config import GemmaConfig
from ...errors import GemmaQuantError
from ...numerics.ggml.types import row_bytes
from ...schemes import Scheme
from .metadata import ARCH, add_model_kvs, finish_like_llama_quantize
from .plan import TensorPlan, plan_types, preset
from .vocab import add_vocab, embedding_rows_kept

if TYPE_CHECKING:
    from ...formats.checkpoint import Checkpoint

ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT  # 32
CONVERT_FTYPE_BF16 = 32  # the converter's general.file_type; llama-quantize replaces it


class _Writer(gguf.GGUFWriter):
    """GGUFWriter with array values packed by numpy / one join instead of one `_pack_val` call per
    element: the 262k-entry tokens, scores and types arrays took ~2 s. Same bytes (the tests
    compare whole files with convert_hf_to_gguf.py's); anything unusual goes to the original."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # id(array value) -> (value, packed bytes): the copies of one model's writer for a set of outputs
        # (`_finish`) share their vocabulary arrays, packed once (the value is kept so its id stays its own)
        self.packed: dict[int, tuple] = {}

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        t = gguf.GGUFValueType
        if (vtype != t.ARRAY or sub_type is not None or self.endianess != gguf.GGUFEndian.LITTLE
                or not isinstance(val, (list, tuple)) or len(val) < 256):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        key = (id(val), add_vtype)
        if key not in self.packed:
            self.packed[key] = (val, self._pack_array(val, vtype, add_vtype, sub_type))
        return self.packed[key][1]

    def _pack_array(self, val, vtype, add_vtype, sub_type):
        t = gguf.GGUFValueType
        if len(set(map(type, val))) != 1:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = t.get_type(val[0])
        if ltype == t.STRING:
            u64 = struct.Struct("<Q").pack
            enc = (v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val)
            body = b"".join(u64(len(e)) + e for e in enc)
        elif ltype in (t.INT32, t.FLOAT32, t.BOOL):
            body = np.array(val, dtype={t.INT32: "<i4", t.FLOAT32: "<f4", t.BOOL: "?"}[ltype]).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = (struct.pack("<I", int(vtype)) if add_vtype else b"") + struct.pack("<IQ", int(ltype), len(val))
        return head + body


def build_header(model_dir: Path, config: GemmaConfig, scheme: Scheme, plans: list[TensorPlan],
                 imatrix_meta: dict | None, extra_kv: dict | None = None) -> gguf.GGUFWriter:
    """A GGUFWriter (no file yet) holding every key and tensor info of the output."""
    return _finish(_model_keys(model_dir, config, plans), HeaderSpec(scheme, plans, imatrix_meta, extra_kv))


@dataclass(frozen=True)
class HeaderSpec:
    """What differs between the headers of one model's outputs: the preset (general.file_type), the
    per-tensor types, the imatrix keys and gemmaquant's own keys."""
    scheme: Scheme
    plans: list[TensorPlan]
    imatrix_meta: dict | None = None
    extra_kv: dict | None = None


def _model_keys(model_dir: Path, config: GemmaConfig, plans: list[TensorPlan]) -> gguf.GGUFWriter:
    """The keys every output of this model shares (the converter's: model, vocabulary), no tensor infos."""
    w = _Writer(None, ARCH[config.generation])
    total = sum(p.numel for p in plans)
    add_model_kvs(w, model_dir, config, file_type=CONVERT_FTYPE_BF16, total_params=total,
                  experts=expert_params(plans))
    arrays = add_vocab(w, model_dir, config.generation, config.vocab_size)
    if len(arrays.tokens) != config.vocab_size:  # the Gemma 3 converter cuts token_embd to the token list
        raise GemmaQuantError(f"{model_dir}: {len(arrays.tokens)} tokens for vocab_size {config.vocab_size}")
    if config.generation == 4 and embedding_rows_kept(model_dir, config.vocab_size) != config.vocab_size:
        raise GemmaQuantError(f"{model_dir}: tokenizer.json lists fewer tokens than vocab_size {config.vocab_size}; "
                              "the converter would cut token_embd, which gemmaquant does not reproduce")
    return w


def _finish(base: gguf.GGUFWriter, spec: HeaderSpec) -> gguf.GGUFWriter:
    """A copy of `base` completed as llama-quantize completes it for `spec`, with its tensor infos.
    The copy shares the value objects (the vocabulary arrays) and their packed bytes with `base`."""
    w = copy.copy(base)
    w.kv_data, w.tensors = [dict(base.kv_data[0])], [{}]
    finish_like_llama_quantize(w, spec.scheme.ftype, spec.imatrix_meta, spec.extra_kv)
    for p in spec.plans:
        rows = p.numel // p.n_per_row
        nbytes = rows * row_bytes(p.type, p.n_per_row)
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.type)
    return w


def expert_params(plans: list[TensorPlan]) -> tuple[int, int, int]:
    """(shared, per-expert, expert count) parameters as the converter's writer counts them for the
    size label: tensors named `*_exps.*` with 3 dims are experts, everything else is shared."""
    exps = [p for p in plans if "_exps." in p.name and len(p.shape) >= 3]
    if not exps:
        return 0, 0, 0
    shared = sum(p.numel for p in plans if p not in exps)
    return shared, sum(p.numel // p.shape[0] for p in exps), sum(p.shape[0] for p in exps) // len(exps)


def header_bytes(model_dir: Path, config: GemmaConfig, scheme: Scheme, plans: list[TensorPlan],
                 imatrix_meta: dict | None, extra_kv: dict | None = None) -> tuple[bytes, dict]:
    """The header as bytes (magic, counts, keys, tensor infos, zero padding to ALIGNMENT), written
    by GGUFWriter's own methods into memory, and the keys ({name: GGUFValue}, for the read-back check)."""
    return header_set_bytes(model_dir, config, [HeaderSpec(scheme, plans, imatrix_meta, extra_kv)])[0]


def header_set_bytes(model_dir: Path, config: GemmaConfig, specs: list[HeaderSpec]) -> list[tuple[bytes, dict]]:
    """header_bytes of several outputs of one model (a multi-preset run): the model's keys and its
    vocabulary are read and packed once, then each spec's own keys and tensor infos are added."""
    try:
        base = _model_keys(model_dir, config, specs[0].plans)
        writers = [_finish(base, spec) for spec in specs]
    except GemmaQuantError:
        raise
    except Exception as e:  # noqa: BLE001 - the gguf package's own readers of the model's side files
        _diagnose(Path(model_dir))
        raise GemmaQuantError(f"{model_dir}: building the GGUF header failed ({type(e).__name__}: {e})") from None
    out = []
    for w in writers:
        buf = io.BytesIO()
        w.fout, w.state = [buf], WriterState.EMPTY  # an open output: GGUFWriter writes into `buf`
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        except (struct.error, OverflowError, ValueError, TypeError) as e:
            raise GemmaQuantError(_unpackable(w, Path(model_dir), e)) from None
        n = buf.tell()
        buf.write(b"\0" * (-n % ALIGNMENT))
        out.append((buf.getvalue(), dict(w.kv_data[0])))
    return out


# Where the value of a key comes from, for messages: the converter takes sampling defaults from
# generation_config.json, tokenizer keys from the tokenizer files, the rest from config.json.
_KEY_SOURCES = (("general.sampling.", "generation_config.json"), ("tokenizer.", "the tokenizer files"),
                ("general.", "config.json / README.md"), ("", "config.json"))
_SIDE_JSON = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "tokenizer.json")


def _unpackable(w: gguf.GGUFWriter, model_dir: Path, err: Exception) -> str:
    """Name the key whose value its GGUF type cannot hold (struct says only 'argument out of range')."""
    for key, val in w.kv_data[0].items():
        try:
            w._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type)
        except (struct.error, OverflowError, ValueError, TypeError):
            src = next(f for prefix, f in _KEY_SOURCES if key.startswith(prefix))
            shown = repr(val.value) if not isinstance(val.value, (list, tuple)) else f"an array of {len(val.value)}"
            return (f"{model_dir}: GGUF key '{key}' cannot hold {shown} as {val.type.name.lower()} "
                    f"(the value comes from {src})")
    return f"{model_dir}: the GGUF header cannot be written ({type(err).__name__}: {err})"


def _diagnose(model_dir: Path) -> None:
    """Raise the one-line error of the first malformed JSON side file, if any is."""
    from ...formats.inputs import read_json

    for name in _SIDE_JSON:
        if (model_dir / name).exists():
            read_json(model_dir / name, name)


# A vocabulary this large makes the header worth a process (starting one costs a fraction of what a
# real vocabulary takes, RESULTS.md §8): real Gemma vocabularies are 256k-262k entries; the test
# suite's tiny models (64-512) build inline at once.
BACKGROUND_MIN_VOCAB = 32768


class HeaderJob:
    """The headers of one model's outputs (one, or a multi-preset set's), built inline or in one child
    process; `result(k)` -> (bytes, keys) of output k.

    `background`: None decides by the vocabulary size (BACKGROUND_MIN_VOCAB). `specs` (and for one
    output `scheme`, `plans`, `imatrix_meta`) are kept so the writer can check the job belongs to the
    files it writes."""

    def __init__(self, model_dir: Path, config: GemmaConfig, scheme: Scheme, plans: list[TensorPlan],
                 imatrix_meta: dict | None = None, background: bool | None = None, extra_kv: dict | None = None,
                 specs: list[HeaderSpec] | None = None):
        self.specs = specs or [HeaderSpec(scheme, plans, imatrix_meta, extra_kv)]
        self.scheme, self.plans, self.imatrix_meta = scheme, plans, imatrix_meta
        self._args = (Path(model_dir), config, self.specs)
        self._result: list[tuple[bytes, dict]] | None = None
        self._proc: subprocess.Popen | None = None
        if background is None:
            background = (config.vocab_size or 0) >= BACKGROUND_MIN_VOCAB
        if background:
            self._start()

    @classmethod
    def of_set(cls, model_dir: Path, config: GemmaConfig, specs: list[HeaderSpec],
               background: bool | None = None) -> "HeaderJob":
        """One job for several outputs: the vocabulary is read once for all of them."""
        return cls(model_dir, config, specs[0].scheme, specs[0].plans, specs[0].imatrix_meta, background,
                   specs[0].extra_kv, specs=list(specs))

    def _start(self) -> None:
        pkg_root = str(Path(__file__).resolve().parents[2])  # the directory holding `gemmaquant`
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from gemmaquant.export.gguf.header import child_main; child_main()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                start_new_session=True)  # Ctrl-C reaches the parent only; it stops the child (close)
        except OSError:
            self._proc = None  # no subprocess here: build inline when asked
            return
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        # drain both pipes on threads so the child never blocks on a full pipe and `ready()` is exact
        self._readers = [threading.Thread(target=lambda s=s, d=d: d.append(s.read()), daemon=True)
                         for s, d in ((self._proc.stdout, self._out), (self._proc.stderr, self._err))]
        for t in self._readers:
            t.start()
        try:
            self._proc.stdin.write(pickle.dumps(self._args, protocol=pickle.HIGHEST_PROTOCOL))
            self._proc.stdin.close()
        except OSError:
            pass  # the child died at start: result() reports its stderr

    def ready(self) -> bool:
        """True once result() would not wait."""
        return self._result is not None or self._proc is None or not any(t.is_alive() for t in self._readers)

    def result(self, k: int = 0) -> tuple[bytes, dict]:
        """Output k's header bytes and keys (waits for the child)."""
        if self._result is not None:
            return self._result[k]
        if self._proc is None:
            self._result = header_set_bytes(*self._args)
            return self._result[k]
        for t in self._readers:
            t.join()
        code = self._proc.wait()
        out, err = b"".join(self._out), b"".join(self._err).decode("utf-8", "replace").strip()
        self._proc = None
        if code != 0 or not out:
            raise GemmaQuantError(f"building the GGUF header failed (child exit code {code})"
                                  + (f": {err.splitlines()[-1]}" if err else ""))
        ok, payload = pickle.loads(out)
        if not ok:
            raise GemmaQuantError(payload)
        self._result = payload
        return self._result[k]

    def close(self) -> None:
        """Stop the child if it is still running (an error or Ctrl-C elsewhere)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def child_main() -> None:
    """Entry point of the header process: pickled args on stdin, pickled (ok, payload) on stdout."""
    from ..procs import die_with_parent

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    args = pickle.load(sys.stdin.buffer)
    try:
        payload = (True, header_set_bytes(*args))
    except GemmaQuantError as e:
        payload = (False, str(e))
    except Exception as e:  # noqa: BLE001 - anything else: the parent raises it with this text
        payload = (False, f"building the GGUF header failed: {type(e).__name__}: {e}")
    sys.stdout.buffer.write(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()


def start_header(ckpt: "Checkpoint", scheme: str | Scheme | list, imatrix_meta: dict | None = None) -> HeaderJob:
    """Start building the header of `write_gguf(ckpt, scheme, ...)` now (in the background for a
    real vocabulary), or with a list of presets the headers of `write_gguf_set` (one job, the
    vocabulary read once). `imatrix_meta`: as passed to the writer with an imatrix, else None."""
    schemes = [preset(s) for s in (scheme if isinstance(scheme, list) else [scheme])]
    has_lm_head = "lm_head.weight" in ckpt.names()
    specs = [HeaderSpec(s, plan_types(ckpt.config, s, imatrix_meta is not None, has_lm_head=has_lm_head), imatrix_meta)
             for s in schemes]
    return HeaderJob.of_set(ckpt.path, ckpt.config, specs)
