"""Issue 15's second round of bad input through the real CLI (in process): input files that are not
regular files, numbers out of range, configs that would build huge structures or garbage, deep
nesting, safetensors headers the reference library refuses, already-quantized sources, imatrix files
that do not fit, tokenizers that do not fit the embedding, GGUF header values that do not fit their key.

Each case: its exit code, one `error:` line naming the file/key/option and the allowed values, no
traceback, nothing created, every input unchanged (sha256). Cases marked `early` must be refused
before any weight is loaded (load_model and open_artifact are made to fail the test if called).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from . import TINY_G3, check_error, digests, forbid_weight_loading, run_cli, tiny_tokenizer_model, tree, write_tiny

TINY_1L = {**TINY_G3, "num_hidden_layers": 1}
CASES: dict = {}


def case(name: str, code: int, match: str, early: bool = True):
    def deco(fn):
        CASES[name] = (fn, code, match, early)
        return fn
    return deco


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("more") / "tiny"
    write_tiny(d, TINY_1L)
    return d


@pytest.fixture(scope="module")
def good_gguf(good):
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.gguf.writer import write_gguf

    out = good.parent / "good.Q8_0.gguf"
    write_gguf(Checkpoint(good), "q8_0", out)
    return out


def _copy(good: Path, tmp: Path, name: str = "m") -> Path:
    d = tmp / name
    shutil.copytree(good, d)
    return d


def _cfg(good: Path, tmp: Path, **changes) -> Path:
    d = _copy(good, tmp)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _text(tmp: Path, name: str = "t.txt") -> Path:
    t = tmp / name
    t.write_text("the cat sat on the mat. " * 200)
    return t


def _fifo(tmp: Path, name: str = "fifo") -> Path:
    p = tmp / name
    os.mkfifo(p)
    return p


def _q(m, tmp, scheme="q8_0", *extra):
    return ["quantize", m, "--scheme", scheme, "-o", tmp / "out" / "x", "--quiet", *extra]


def _eval(m, tmp, *extra):
    return ["eval", m, "--text", _text(tmp), "--ctx", "64", "--chunks", "2", "--quiet", *extra]


DEEP_JSON = '{"a": ' * 100_000 + "1" + "}" * 100_000


# -- input files: regular files only, refused at once ----------------------------------------------------
for _what, _make, _kind in (("a FIFO", _fifo, "a FIFO (named pipe)"), ("/dev/zero", lambda t: Path("/dev/zero"),
                                                                        "a character device"),
                            ("a directory", lambda t: t, "a directory")):
    def _add(what=_what, make=_make, kind=_kind):
        @case(f"eval --text is {what}", 2, f"--text must be a regular file, this is {kind}")
        def _(tmp, good, gg):
            return ["eval", gg, "--text", make(tmp), "--quiet"]

        @case(f"compare --text is {what}", 2, f"--text must be a regular file, this is {kind}")
        def _(tmp, good, gg):
            return ["compare", good, gg, "--text", make(tmp), "--quiet"]

        @case(f"quantize --calib is {what}", 2, f"--calib must be a regular file, this is {kind}")
        def _(tmp, good, gg):
            return _q(good, tmp, "w4a16", "--calib", make(tmp))

        @case(f"imatrix --calib is {what}", 2, f"--calib must be a regular file, this is {kind}")
        def _(tmp, good, gg):
            return ["imatrix", good, "-o", tmp / "im.gguf", "--calib", make(tmp)]

        @case(f"quantize --imatrix-file is {what}", 2, f"--imatrix-file must be a regular file, this is {kind}")
        def _(tmp, good, gg):
            return _q(good, tmp, "q4_k_m", "--imatrix-file", make(tmp))
    _add()


@case("inspect a FIFO", 2, "PATH must be a regular file, this is a FIFO")
def _(tmp, good, gg):
    return ["inspect", _fifo(tmp)]


@case("eval a FIFO as the model", 2, "a model file must be a regular file, this is a FIFO")
def _(tmp, good, gg):
    return ["eval", _fifo(tmp), "--text", _text(tmp)]


@case("quantize --calib /dev/urandom", 2, "--calib must be a regular file, this is a character device")
def _(tmp, good, gg):
    return _q(good, tmp, "q4_k_m", "--imatrix", "--calib", "/dev/urandom")


@case("--recipe is a FIFO", 2, "--recipe must be a regular file, this is a FIFO")
def _(tmp, good, gg):
    return ["quantize", good, "--recipe", _fifo(tmp, "r.toml"), "-o", tmp / "x.gguf"]


@case("recipe's calib is a FIFO", 2, "--calib must be a regular file, this is a FIFO")
def _(tmp, good, gg):
    (tmp / "r.toml").write_text(f'scheme = "w4a16"\ncalib = "{_fifo(tmp)}"\n')
    return ["quantize", good, "--recipe", tmp / "r.toml", "-o", tmp / "x"]


@case("missing --text", 2, "no such file (--text must be a regular file)")
def _(tmp, good, gg):
    return ["eval", gg, "--text", tmp / "nope.txt"]


@case("empty --text", 2, "--text: the path is empty")
def _(tmp, good, gg):
    return ["eval", gg, "--text", ""]


# -- numbers, checked before work starts ----------------------------------------------------------------------
NUMBERS = [
    (["eval"], ["--ctx", "65536"], "--ctx 65536: ", "has a context of 2048 tokens (allowed: 8..2048, even)"),
    (["eval"], ["--ctx", "7"], "--ctx 7: must be an even integer in 8..", ""),
    (["eval"], ["--ctx", "99"], "--ctx 99: must be an even number", ""),
    (["eval"], ["--chunks", "0"], "--chunks 0: must be an integer in 1..", ""),
    (["eval"], ["--chunks", "-1"], "--chunks -1: must be an integer in 1..", ""),
    (["eval"], ["--threads", "0"], "--threads 0: must be an integer in 1..1024", ""),
    (["eval"], ["--threads", "100000"], "--threads 100000: must be an integer in 1..1024", ""),
    (["eval"], ["--device", "tpu"], "--device 'tpu' is not supported (allowed: cpu, cuda, cuda:N)", ""),
    (["eval"], ["--dtype", "float8"], "dtype 'float8' is not supported (allowed: auto", ""),
    (["compare"], ["--topk", "0"], "--topk 0: must be an integer in 1..", ""),
    (["compare"], ["--topk", "100000"], "--topk 100000: ", "has 512 tokens (allowed: 1..512)"),
    (["compare"], ["--layer-chunks", "-1"], "--layer-chunks -1: must be an integer in 0..4096", ""),
    (["compare"], ["--ctx", "65536"], "--ctx 65536: ", "has a context of 2048 tokens"),
    (["quantize"], ["--calib-samples", "0"], "--calib-samples 0: must be an integer in 1..1048576", ""),
    (["quantize"], ["--calib-samples", str(10**12)], f"--calib-samples {10**12}: must be an integer in 1..1048576", ""),
    (["quantize"], ["--calib-len", "1"], "--calib-len 1: must be an integer in 2..", ""),
    (["quantize"], ["--calib-len", "100000"], "--calib-len 100000: ", "has a context of 2048 tokens (allowed: 2..2048)"),
    (["quantize"], ["--calib-samples", "1048576", "--calib-len", "2048"], "--calib-samples 1048576 x --calib-len 2048: ",
     "more than this machine's"),
    (["quantize"], ["--alpha", "1.5"], "--alpha 1.5: must be a number in 0..1", ""),
    (["quantize"], ["--alpha", "nan"], "--alpha nan: must be a number in 0..1", ""),
    (["quantize"], ["--device", "gpu"], "--device 'gpu' is not supported", ""),
    (["imatrix"], ["--calib-samples", "0"], "--calib-samples 0: must be an integer in 1..", ""),
    (["imatrix"], ["--calib-len", "4096"], "--calib-len 4096: ", "has a context of 2048 tokens"),
]


def _numbers_case(cmd, extra, match, tail):
    @case(f"{cmd[0]} {' '.join(extra)}", 2, match)
    def _(tmp, good, gg):
        if cmd[0] == "eval":
            return ["eval", gg, "--text", _text(tmp), "--quiet", *extra]
        if cmd[0] == "compare":
            return ["compare", good, gg, "--text", _text(tmp), "--quiet", *extra]
        if cmd[0] == "imatrix":
            return ["imatrix", good, "-o", tmp / "im.gguf", *extra]
        return _q(good, tmp, "int8", *extra)
    CASES[f"{cmd[0]} {' '.join(extra)}"] += (tail,)


for _cmd, _extra, _match, _tail in NUMBERS:
    _numbers_case(_cmd, _extra, _match, _tail)


@case("--device cuda without a GPU", 2, "--device cuda: torch sees no CUDA GPU on this machine")
def _(tmp, good, gg):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    return ["eval", gg, "--text", _text(tmp), "--device", "cuda"]


@case("recipe calib_samples out of range", 2, "'calib_samples' must be in 1..1048576, got 1000000000000")
def _(tmp, good, gg):
    (tmp / "r.toml").write_text('scheme = "w4a16"\ncalib_samples = 1000000000000\n')
    return ["quantize", good, "--recipe", tmp / "r.toml", "-o", tmp / "x"]


@pytest.mark.parametrize("args,match", [
    (["--threads", "2.5"], "Invalid value for '--threads'"), (["--ctx", "1e9"], "Invalid value for '--ctx'"),
    (["--bogus", "3"], "No such option: --bogus"), (["--chunks"], "Option '--chunks' requires an argument")])
def test_usage_errors_are_one_line(args, match, good_gguf, tmp_path, capsys):
    """typer's own parse errors (not a number, an unknown or incomplete option) ended in a traceback."""
    check_error(run_cli(["eval", good_gguf, "--text", _text(tmp_path), *args], capsys), 2, match)
    check_error(run_cli(["imatrix", good_gguf], capsys), 2, "Missing option '--out'")
    check_error(run_cli(["eval"], capsys), 2, "Missing argument 'model'")


# -- config values: huge structures or garbage, refused naming the key and the range ----------------------
CONFIGS = {
    "num_hidden_layers": (10**9, "'num_hidden_layers' must be an integer in 1..1024, got 1000000000"),
    "sliding_window": (-1, "'sliding_window' must be an integer in 1..16777216, got -1"),
    "rope_theta": (0, "'rope_theta' must be a finite number > 0, got 0"),
    "rms_norm_eps": (-1e-6, "'rms_norm_eps' must be a number with 0 < rms_norm_eps < 1, got -1e-06"),
    "sliding_window_pattern": (0, "'sliding_window_pattern' must be an integer in 1..1024, got 0"),
    "final_logit_softcapping": (0, "'final_logit_softcapping' must be a finite number > 0, got 0"),
    "max_position_embeddings": (2**40, "'max_position_embeddings' must be an integer in 1..16777216"),
    "vocab_size": (2**40, "'vocab_size' must be an integer in 1..16777216"),
    "hidden_size": (1e9, "'hidden_size' must be an integer in 1..131072, got 1000000000.0"),
    "query_pre_attn_scalar": (-1, "'query_pre_attn_scalar' must be a finite number > 0, got -1"),
    "rope_local_base_freq": (float("nan"), "'rope_local_base_freq' must be a finite number > 0, got nan"),
}
for _key, (_value, _match) in CONFIGS.items():
    def _add_cfg(key=_key, value=_value, match=_match):
        @case(f"config {key} = {value} (quantize)", 2, f"config.json: {match}")
        def _(tmp, good, gg):
            return _q(_cfg(good, tmp, **{key: value}), tmp)
    _add_cfg()


@case("config rope_theta 0 (eval: was ppl NaN, exit 0)", 2, "'rope_theta' must be a finite number > 0")
def _(tmp, good, gg):
    return _eval(_cfg(good, tmp, rope_theta=0), tmp)


@case("config rope scaling factor 0", 2, "'rope_scaling.factor' must be a finite number > 0, got 0")
def _(tmp, good, gg):
    return _q(_cfg(good, tmp, rope_scaling={"rope_type": "linear", "factor": 0}), tmp)


# -- deep nesting: one line, no RecursionError ------------------------------------------------------------
for _file, _cmd in (("config.json", "quantize"), ("tokenizer_config.json", "eval"), ("tokenizer_config.json", "quantize"),
                    ("generation_config.json", "eval"), ("special_tokens_map.json", "fp8")):
    def _add_deep(file=_file, cmd=_cmd):
        @case(f"deeply nested {file} ({cmd})", 2, f"{file}: not valid JSON (nested too deeply)",
              early=file == "config.json")
        def _(tmp, good, gg):
            d = _copy(good, tmp)
            (d / file).write_text(DEEP_JSON)
            if cmd == "eval":
                return _eval(d, tmp)
            return _q(d, tmp, "fp8" if cmd == "fp8" else "q8_0")
    _add_deep()


@case("deeply nested recipe TOML", 2, "r.toml: not valid TOML (nested too deeply)")
def _(tmp, good, gg):
    (tmp / "r.toml").write_text('scheme = "q8_0"\nx = ' + "[" * 100_000 + "]" * 100_000 + "\n")
    return ["quantize", good, "--recipe", tmp / "r.toml", "-o", tmp / "x.gguf"]


# -- safetensors headers refused as the reference library refuses them ----------------------------------
def _st_header(d: Path) -> tuple[bytes, bytes]:
    data = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8:8 + n], data[8 + n:]


def _st_write(d: Path, header: bytes, body: bytes, n: int | None = None):
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + body)


@case("safetensors header with a duplicate tensor key", 2, "header has the key 'model.norm.weight' twice")
def _(tmp, good, gg):
    d = _copy(good, tmp)
    h, body = _st_header(d)
    entry = json.dumps({"model.norm.weight": json.loads(h)["model.norm.weight"]})[1:-1]
    _st_write(d, h.rstrip()[:-1] + b"," + entry.encode() + b"}", body)
    return _q(d, tmp)


@case("safetensors header with a duplicate __metadata__", 2, "header has the key '__metadata__' twice")
def _(tmp, good, gg):
    d = _copy(good, tmp)
    h, body = _st_header(d)
    _st_write(d, h.rstrip()[:-1] + b',"__metadata__":{"format":"pt"}}', body)
    return _q(d, tmp)


@case("safetensors __metadata__ value that is not a string", 2,
      "header '__metadata__' value of 'format' is int, not a string")
def _(tmp, good, gg):
    d = _copy(good, tmp)
    h, body = _st_header(d)
    hd = json.loads(h)
    hd["__metadata__"] = {"format": 1}
    _st_write(d, json.dumps(hd).encode(), body)
    return _q(d, tmp)


@case("safetensors header length beyond 100 MiB (file larger still)", 2,
      "header length 150000000 is larger than the 104857600 bytes safetensors allows")
def _(tmp, good, gg):
    d = _copy(good, tmp)
    h, body = _st_header(d)
    _st_write(d, h, body, n=150_000_000)
    with open(d / "model.safetensors", "r+b") as f:  # sparse: 200 MB on paper, no disk used
        f.truncate(200_000_000)
    return _q(d, tmp)


@case("safetensors header length beyond the file", 2, "is larger than the file")
def _(tmp, good, gg):
    d = _copy(good, tmp)
    h, body = _st_header(d)
    _st_write(d, h, body, n=len(h) + len(body) + 1)
    return _q(d, tmp)


# -- already-quantized sources, every scheme -------------------------------------------------------------
def _schemes():
    from gemmaquant.schemes import SCHEMES

    return list(SCHEMES)


@pytest.fixture(scope="module")
def f8_source(good, tmp_path_factory):
    from safetensors.torch import load_file

    t = load_file(good / "model.safetensors")
    t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"].to(torch.float8_e4m3fn)
    d = tmp_path_factory.mktemp("f8") / "f8"
    write_tiny(d, TINY_1L, tensors=t)
    return d


@pytest.fixture(scope="module")
def ct_source(good, tmp_path_factory):
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export import write_compressed_tensors
    from gemmaquant.schemes import get_scheme

    d = tmp_path_factory.mktemp("ct") / "tiny-FP8"
    write_compressed_tensors(Checkpoint(good), get_scheme("fp8"), d, progress=False)
    return d


@pytest.mark.parametrize("scheme", _schemes())
def test_already_quantized_source_is_refused(scheme, f8_source, ct_source, tmp_path, capsys):
    for src, match in ((f8_source, "is F8_E4M3; expected a bf16/f16/f32 source checkpoint"),
                       (ct_source, "is F8_E4M3; expected a bf16/f16/f32 source")):
        sums = digests(src)
        check_error(run_cli(_q(src, tmp_path, scheme), capsys), 2, match)
        assert tree(tmp_path) == [] and digests(src) == sums


def test_a_quantization_config_marks_a_source_as_quantized(good, tmp_path, capsys):
    d = _cfg(good, tmp_path, quantization_config={"quant_method": "gptq", "bits": 4})
    check_error(run_cli(_q(d, tmp_path / "o"), capsys), 2, "has a quantization_config (quant_method 'gptq')")


# -- imatrix files that do not fit -------------------------------------------------------------------------
def _imatrix(tmp: Path, names: list[str]) -> Path:
    from gemmaquant.formats.gguf.imatrix import write_imatrix

    p = tmp / "im.gguf"
    write_imatrix(p, {n: torch.ones(256) for n in names}, {n: 4 for n in names}, datasets=["d"], chunk_count=1,
                  chunk_size=4)
    return p


@case("an imatrix that matches no tensor", 2, "none of its 2 entries names a tensor of this model", early=False)
def _(tmp, good, gg):
    return _q(good, tmp, "q4_k_m", "--imatrix-file", _imatrix(tmp, ["model.foo.weight", "x.weight"]))


def test_a_partial_imatrix_names_the_missing_tensors(good, tmp_path, capsys):
    im = _imatrix(tmp_path, ["blk.0.attn_q.weight"])
    res = run_cli(["quantize", good, "-s", "q4_k_m", "-o", tmp_path / "x.gguf", "--imatrix-file", im, "--json"], capsys)
    assert res.code == 0, res.stderr
    note = next(n for n in json.loads(res.stdout)["notes"] if "no entry" in n)
    assert "no entry for 6 tensors" in note and "blk.0.attn_k.weight" in note and "attn_q" not in note


# -- GGUF header values that do not fit their key ---------------------------------------------------------
@case("generation_config top_k beyond int32", 2,
      "GGUF key 'general.sampling.top_k' cannot hold 1099511627776 as int32 (the value comes from generation_config.json)",
      early=False)
def _(tmp, good, gg):
    d = _copy(good, tmp)
    (d / "generation_config.json").write_text('{"top_k": 1099511627776}')
    return _q(d, tmp)


# -- tokenizers that do not fit the embedding, corrupt tokenizer.json ------------------------------------
def _tok_mismatch(good: Path, tmp: Path, tokens: int, rows: int) -> Path:
    d = _copy(good, tmp)
    if rows != TINY_1L["vocab_size"]:
        shutil.rmtree(d)
        write_tiny(d, {**TINY_1L, "vocab_size": rows}, tokenizer=False)
    (d / "tokenizer.model").write_bytes(tiny_tokenizer_model(tokens))
    return d


for _cmd in ("q8_0", "fp8", "eval"):
    def _add_tok(cmd=_cmd):
        @case(f"tokenizer 520 tokens, embedding 512 rows ({cmd})", 2,
              "the tokenizer has 520 tokens but the embedding has 512 rows", early=False)
        def _(tmp, good, gg):
            d = _tok_mismatch(good, tmp, 520, 512)
            return _eval(d, tmp) if cmd == "eval" else _q(d, tmp, cmd)

        @case(f"tokenizer 512 tokens, embedding 2,048 rows ({cmd})", 2,
              "the tokenizer has 512 tokens but the embedding has 2,048 rows", early=False)
        def _(tmp, good, gg):
            d = _tok_mismatch(good, tmp, 512, 2048)
            return _eval(d, tmp) if cmd == "eval" else _q(d, tmp, cmd)

        @case(f"corrupt tokenizer.json ({cmd})", 2, "tokenizer.json: not", early=False)
        def _(tmp, good, gg):
            d = _copy(good, tmp)
            (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
            return _eval(d, tmp) if cmd == "eval" else _q(d, tmp, cmd)
    _add_tok()


# -- eval/compare give inspect's verdict on overlapping tensor data -------------------------------------
def _overlapping(gg: Path, tmp: Path) -> Path:
    """Point one norm's data at another's: same bytes, two tensors."""
    from gemmaquant.formats.gguf.reader import GGUFFile

    f = GGUFFile(gg)
    a, b = f.tensors["blk.0.attn_norm.weight"], f.tensors["blk.0.ffn_norm.weight"]
    start = f.data_start
    f.close()
    data = bytearray(gg.read_bytes())
    info = data.index(len(b.name.encode()).to_bytes(8, "little") + b.name.encode())  # its tensor-info record
    rec = info + 8 + len(b.name.encode()) + 4 + 8 * len(b.shape) + 4  # its u64 data offset
    data[rec:rec + 8] = struct.pack("<Q", a.offset - start)
    p = tmp / "overlap.gguf"
    p.write_bytes(bytes(data))
    return p


for _cmd in ("eval", "compare", "inspect"):
    def _add_ov(cmd=_cmd):
        @case(f"GGUF with overlapping tensor data ({cmd})", 2,
              "tensors 'blk.0.attn_norm.weight' and 'blk.0.ffn_norm.weight' overlap in the data section")
        def _(tmp, good, gg):
            p = _overlapping(gg, tmp)
            if cmd == "inspect":
                return ["inspect", p]
            if cmd == "eval":
                return _eval(p, tmp)
            return ["compare", good, p, "--text", _text(tmp), "--ctx", "64", "--quiet", "--no-cache"]
    _add_ov()


# -- the runner ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, good, good_gguf, tmp_path, capsys, monkeypatch):
    fn, code, match, early, *tail = CASES[name]
    args = fn(tmp_path, good, good_gguf)
    before, sums = tree(tmp_path), digests(tmp_path, good, good_gguf)
    if early:
        forbid_weight_loading(monkeypatch)
    line = check_error(run_cli(args, capsys), code, match)
    if tail and tail[0]:
        assert tail[0] in line, line
    assert tree(tmp_path) == before and digests(tmp_path, good, good_gguf) == sums
