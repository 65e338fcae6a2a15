"""Bad input through the real CLI entry point (issue 8 §1, §5): each case must end with one clear
error line naming what/where/expected, a non-zero documented exit code, no traceback, and nothing
(not even a temporary) at the output path.

Every case builds its input from one tiny valid Gemma 3 checkpoint; `test_the_good_input_works`
proves that checkpoint passes, so each failure below is caused by the one thing the case breaks.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import struct
from pathlib import Path

import pytest

from . import TINY_G3, run_cli, tree, write_tiny

TINY_1L = {**TINY_G3, "num_hidden_layers": 1}
CASES: dict = {}


def case(name: str, code: int, match: str):
    """Register `fn(tmp, good) -> (args, out)`: expect exit `code` and `match` in the error line."""
    def deco(fn):
        CASES[name] = (fn, code, match)
        return fn
    return deco


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "tiny"
    write_tiny(d, TINY_1L)
    return d


def _copy(good: Path, tmp: Path, name: str = "m") -> Path:
    d = tmp / name
    shutil.copytree(good, d)
    return d


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_header(path: Path, header: dict, body: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + body)


def _q(d: Path, tmp: Path, scheme: str = "q8_0") -> tuple[list, Path]:
    out = tmp / "out" / f"x.{scheme}.gguf"
    return ["quantize", d, "--scheme", scheme, "-o", out, "--quiet"], out


# -- the model directory ----------------------------------------------------------------------------
@case("missing model directory", 2, "no such directory")
def _(tmp, good):
    return _q(tmp / "nope", tmp)


@case("empty model directory", 2, "model directory is empty")
def _(tmp, good):
    (tmp / "empty").mkdir()
    return _q(tmp / "empty", tmp)


@case("config.json is not JSON", 2, "config.json: not valid JSON")
def _(tmp, good):
    d = _copy(good, tmp)
    (d / "config.json").write_text('{"model_type": "gemma3_text",')
    return _q(d, tmp)


@case("config.json is not Gemma", 2, "model_type 'llama' is not a Gemma text model")
def _(tmp, good):
    d = _copy(good, tmp)
    (d / "config.json").write_text(json.dumps({**TINY_1L, "model_type": "llama"}))
    return _q(d, tmp)


@case("config.json disagrees with the tensor shapes", 2, "config.json implies")
def _(tmp, good):
    d = _copy(good, tmp)
    (d / "config.json").write_text(json.dumps({**TINY_1L, "intermediate_size": 1024}))
    return _q(d, tmp)


@case("pickle-only checkpoint", 2, "never unpickles")
def _(tmp, good):
    d = tmp / "pkl"
    d.mkdir()
    shutil.copy(good / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return _q(d, tmp)


# -- safetensors ----------------------------------------------------------------------------------
@case("safetensors header length lies", 2, "header length")
def _(tmp, good):
    d = _copy(good, tmp)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    return _q(d, tmp)


@case("safetensors truncated", 2, "truncated")
def _(tmp, good):
    d = _copy(good, tmp)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 4096])
    return _q(d, tmp)


@case("safetensors offsets beyond the file", 2, "data ends at byte")
def _(tmp, good):
    d = _copy(good, tmp)
    header, body = _header(d / "model.safetensors")
    name = "model.norm.weight"
    a, b = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(body) + 2, len(body) + 2 + b - a]
    _write_header(d / "model.safetensors", header, body)
    return _q(d, tmp)


@case("safetensors overlapping offsets", 2, "overlap in the data section")
def _(tmp, good):
    d = _copy(good, tmp)
    header, body = _header(d / "model.safetensors")
    header["model.norm.weight"]["data_offsets"] = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    _write_header(d / "model.safetensors", header, body)
    return _q(d, tmp)


@case("safetensors header is not JSON", 2, "header is not valid JSON")
def _(tmp, good):
    d = _copy(good, tmp)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:8] + b"\xff" * 16 + data[24:])
    return _q(d, tmp)


@case("unsupported dtype in the header", 2, "unsupported dtype 'C64'")
def _(tmp, good):
    d = _copy(good, tmp)
    header, body = _header(d / "model.safetensors")
    header["model.norm.weight"]["dtype"] = "C64"
    _write_header(d / "model.safetensors", header, body)
    return _q(d, tmp)


@case("integer weights (already quantized?)", 2, "expected a bf16/f16/f32 source checkpoint")
def _(tmp, good):
    d = _copy(good, tmp)
    header, body = _header(d / "model.safetensors")
    header["model.norm.weight"]["dtype"] = "I16"  # same byte size as bf16
    _write_header(d / "model.safetensors", header, body)
    return _q(d, tmp)


@case("NaN in a weight", 2, "contains NaN/inf")
def _(tmp, good):
    from safetensors.torch import load_file

    t = load_file(good / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    d = tmp / "nan"
    write_tiny(d, TINY_1L, tensors=t)
    return _q(d, tmp)


@case("NaN in a weight, K-quant (quantized in a worker process)", 2, "'model.layers.0.mlp.up_proj.weight' contains NaN/inf")
def _(tmp, good):
    from safetensors.torch import load_file

    t = load_file(good / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][7, 1] = float("nan")
    d = tmp / "nan"
    write_tiny(d, TINY_1L, tensors=t)
    return _q(d, tmp, "q4_k_m")


@case("Inf in a weight, compressed-tensors output", 2, "NaN")
def _(tmp, good):
    from safetensors.torch import load_file

    t = load_file(good / "model.safetensors")
    t["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("inf")
    d = tmp / "inf"
    write_tiny(d, TINY_1L, tensors=t)
    out = tmp / "out" / "x-FP8"
    return ["quantize", d, "--scheme", "fp8", "-o", out, "--quiet"], out


# -- sharded checkpoints -----------------------------------------------------------------------------
def _sharded(good: Path, tmp: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    d = tmp / "sharded"
    d.mkdir()
    shutil.copy(good / "config.json", d)
    t = load_file(good / "model.safetensors")
    names = sorted(t)
    wm = {}
    for k, part in enumerate((names[::2], names[1::2])):
        f = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: t[n] for n in part}, str(d / f))
        wm.update({n: f for n in part})
    edit(d, wm)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return d


@case("a shard named in the index is missing", 2, "which is missing from")
def _(tmp, good):
    return _q(_sharded(good, tmp, lambda d, wm: (d / "model-00002-of-00002.safetensors").unlink()), tmp)


@case("path traversal in the index", 2, "is not a plain file name")
def _(tmp, good):
    def edit(d, wm):
        (tmp / "outside.safetensors").write_bytes((d / "model-00002-of-00002.safetensors").read_bytes())
        for n, f in wm.items():
            if f.startswith("model-00002"):
                wm[n] = "../outside.safetensors"
    return _q(_sharded(good, tmp, edit), tmp)


@case("index is not JSON", 2, "not a valid index")
def _(tmp, good):
    d = _sharded(good, tmp, lambda d, wm: None)
    (d / "model.safetensors.index.json").write_text("[1, 2")
    return _q(d, tmp)


# -- schemes, presets, recipes --------------------------------------------------------------------------
@case("unknown scheme", 2, "unknown scheme 'fp7'")
def _(tmp, good):
    return _q(good, tmp, "fp7")


@case("unknown GGUF preset", 2, "q3_k_xl")
def _(tmp, good):
    return _q(good, tmp, "q3_k_xl")


@case(".gguf output for a safetensors scheme", 2, "needs a GGUF scheme")
def _(tmp, good):
    args, out = _q(good, tmp, "w4a16")
    return args, out


@case("unknown recipe name", 2, "unknown recipe 'no-such-recipe'")
def _(tmp, good):
    out = tmp / "out" / "x"
    return ["quantize", good, "--recipe", "no-such-recipe", "-o", out], out


@case("unknown recipe key", 2, "unknown key 'bits'")
def _(tmp, good):
    (tmp / "r.toml").write_text('scheme = "q8_0"\nbits = 3\n')
    out = tmp / "out" / "x.gguf"
    return ["quantize", good, "--recipe", tmp / "r.toml", "-o", out], out


@case("recipe is not TOML", 2, "not valid TOML")
def _(tmp, good):
    (tmp / "r.toml").write_text('scheme = "q8_0\n')
    out = tmp / "out" / "x.gguf"
    return ["quantize", good, "--recipe", tmp / "r.toml", "-o", out], out


# -- eval / calibration text --------------------------------------------------------------------------
@case("empty eval text", 2, "the text file is empty")
def _(tmp, good):
    (tmp / "t.txt").write_text(" \n\n")
    return ["eval", good, "--text", tmp / "t.txt", "--quiet"], None


@case("binary eval text", 2, "looks binary")
def _(tmp, good):
    (tmp / "t.txt").write_bytes(bytes(range(256)))
    return ["eval", good, "--text", tmp / "t.txt", "--quiet"], None


@case("empty calibration text", 2, "empty")
def _(tmp, good):
    (tmp / "c.txt").write_text("")
    out = tmp / "out" / "im.gguf"
    return ["imatrix", good, "--calib", tmp / "c.txt", "-o", out, "--calib-samples", "2", "--calib-len", "16"], out


@case("binary calibration text", 2, "UTF-8")
def _(tmp, good):
    (tmp / "c.txt").write_bytes(b"\xff\xfe\x00\x01" * 100)
    out = tmp / "out" / "im.gguf"
    return ["imatrix", good, "--calib", tmp / "c.txt", "-o", out, "--calib-samples", "2", "--calib-len", "16"], out


@case("corrupt imatrix file", 2, "imatrix")
def _(tmp, good):
    (tmp / "bad.dat").write_bytes(b"\x05\x00\x00\x00garbage")
    args, out = _q(good, tmp, "q4_k_m")
    return args + ["--imatrix-file", tmp / "bad.dat"], out


# -- outputs --------------------------------------------------------------------------------------------
@case("output exists without --force", 3, "already exists")
def _(tmp, good):
    args, out = _q(good, tmp)
    out.parent.mkdir(parents=True)
    out.write_text("keep me")
    return args, None  # the existing file must survive, checked below


@case("unwritable output path (parent is a file)", 3, "cannot create the output's parent directory")
def _(tmp, good):
    (tmp / "afile").write_text("x")
    out = tmp / "afile" / "x.gguf"
    return ["quantize", good, "--scheme", "q8_0", "-o", out, "--quiet"], out


# -- GGUF given to eval / inspect ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_gguf(good):
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.gguf.writer import write_gguf

    out = good.parent / "good.Q8_0.gguf"
    write_gguf(Checkpoint(good), "q8_0", out)
    return out


def _gguf_case(tmp, gguf_path, mutate, cmd):
    data = bytearray(gguf_path.read_bytes())
    p = tmp / "bad.gguf"
    p.write_bytes(mutate(data))
    (tmp / "t.txt").write_text("hello world " * 200)
    args = ["eval", p, "--text", tmp / "t.txt", "--quiet"] if cmd == "eval" else ["inspect", p]
    return args, None


GGUF_CASES = {
    "truncated GGUF to eval": ("eval", lambda b: bytes(b[: len(b) // 2]), "truncated"),
    "truncated GGUF to inspect": ("inspect", lambda b: bytes(b[: len(b) // 2]), "truncated"),
    "GGUF cut inside the header, to eval": ("eval", lambda b: bytes(b[:300]), "corrupt"),
    "GGUF cut inside the header, to inspect": ("inspect", lambda b: bytes(b[:300]), "byte offset"),
    "GGUF with a bad version, to inspect": ("inspect", lambda b: b[:4] + struct.pack("<I", 7) + b[8:],
                                            "GGUF version 7 is not supported"),
    "GGUF with a huge key count, to eval": ("eval", lambda b: b[:16] + struct.pack("<Q", 1 << 40) + b[24:],
                                            "impossible in"),
}


for _name, (_cmd, _mut, _match) in GGUF_CASES.items():
    CASES[_name] = (("gguf", _cmd, _mut), 2, _match)


# -- the runner -----------------------------------------------------------------------------------------
def _check(res, code: int, match: str):
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.code == code, (res.code, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert match in lines[0], lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, good, good_gguf, tmp_path, capsys):
    fn, code, match = CASES[name]
    if isinstance(fn, tuple):
        _, cmd, mut = fn
        args, out = _gguf_case(tmp_path, good_gguf, mut, cmd)
    else:
        args, out = fn(tmp_path, good)
    before = tree(tmp_path)
    res = run_cli(args, capsys)
    _check(res, code, match)
    after = tree(tmp_path)
    if out is not None:
        assert not out.exists()
    assert after == before  # no output, no temporaries, not even the parent directories it created
    if name == "output exists without --force":
        assert (tmp_path / "out" / "x.q8_0.gguf").read_text() == "keep me"


def test_disk_full_during_the_write(good, tmp_path, capsys):
    """RLIMIT_FSIZE below the output size: the write fails with EFBIG (Python ignores SIGXFSZ) in the
    middle of the tensor data, as a full disk would; the temporary is removed."""
    out = tmp_path / "x.gguf"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        res = run_cli(["quantize", good, "--scheme", "q8_0", "-o", out, "--quiet"], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    _check(res, 3, "cannot write the output")
    assert tree(tmp_path) == []


def test_no_code_from_the_model_directory_runs(good, tmp_path, capsys):
    """A config.json `auto_map` pointing at a modeling file that would leave a marker if imported."""
    d = _copy(good, tmp_path)
    marker = tmp_path / "pwned"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                       "AutoConfig": "modeling_evil.EvilConfig"}
    (d / "config.json").write_text(json.dumps(cfg))
    for args in (["quantize", d, "--scheme", "q8_0", "-o", tmp_path / "o.gguf", "--quiet"], ["inspect", d]):
        assert run_cli(args, capsys).code == 0
    assert not marker.exists()


def test_the_good_input_works(good, good_gguf, tmp_path, capsys):
    """The base every case breaks is valid: quantize, inspect and eval succeed on it."""
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 40)
    assert run_cli(["quantize", good, "--scheme", "q8_0", "-o", tmp_path / "a.gguf", "--quiet"], capsys).code == 0
    assert run_cli(["inspect", good_gguf], capsys).code == 0
    res = run_cli(["eval", good_gguf, "--text", text, "--ctx", "64", "--json", "-", "--quiet"], capsys)
    assert res.code == 0, res.stderr
    assert math.isfinite(json.loads(res.stdout)["ppl"])


@pytest.mark.parametrize("cut", [100, 2000, -64])
def test_corrupt_gguf_given_to_compare(good, good_gguf, tmp_path, capsys, cut):
    data = good_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 40)
    before = tree(tmp_path)
    res = run_cli(["compare", good, bad, "--text", text, "--ctx", "64", "--no-cache", "--quiet"], capsys)
    _check(res, 2, "truncated" if cut != 100 else "corrupt")
    assert tree(tmp_path) == before
