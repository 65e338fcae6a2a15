"""`gemmaquant inspect` against independent readers: the `gguf` package's GGUFReader for GGUF files
(llama.cpp's own Q4_K_M demo file and one we write), the `safetensors` library for directories."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gemmaquant.errors import GemmaQuantError
from gemmaquant.evaluate.inspect import inspect_path

from ..reliability import TINY_G3, run_cli, write_tiny

gguf = pytest.importorskip("gguf")
TINY_1L = {**TINY_G3, "num_hidden_layers": 1}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect") / "tiny"
    write_tiny(d, TINY_1L)
    return d


@pytest.fixture(scope="module")
def our_gguf(tiny_dir):
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.gguf.writer import write_gguf

    out = tiny_dir.parent / "tiny.Q8_0.gguf"
    write_gguf(Checkpoint(tiny_dir), "q8_0", out)
    return out


def _reader_value(f):
    """A GGUFReader field as a Python value (strings decoded, arrays as lists)."""
    t = f.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        return [bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i][0].item()
                for i in f.data]
    if t == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]][0].item()


def _check_gguf_against_reader(path):
    info = inspect_path(path)
    r = gguf.GGUFReader(path)
    assert info["kind"] == "gguf"
    assert [t["name"] for t in info["tensors"]] == [t.name for t in r.tensors]
    for ours, ref in zip(info["tensors"], r.tensors):
        assert ours["type"] == ref.tensor_type.name
        assert ours["shape"] == [int(x) for x in reversed(ref.shape.tolist())]
        assert ours["bytes"] == int(ref.n_bytes)
        assert ours["parameters"] == int(ref.n_elements)
    n = sum(int(t.n_elements) for t in r.tensors)
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    assert info["parameters"] == n and info["tensor_bytes"] == nbytes
    assert info["bits_per_weight"] == pytest.approx(8 * nbytes / n, abs=1e-4)
    assert info["file_bytes"] == path.stat().st_size
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(info["metadata"]) == list(fields)
    for k, f in fields.items():
        want, got = _reader_value(f), info["metadata"][k]
        if isinstance(got, dict):  # a long array: count and first values
            assert got["count"] == len(want)
            assert got["first"] == (want[:4] if got["array"] == "string" else pytest.approx(want[:4]))
        elif isinstance(want, str) and len(want) > 120:
            assert got.startswith(want[:120])
        else:
            assert got == (pytest.approx(want) if isinstance(want, float) else want), k
    assert info["architecture"] == _reader_value(r.fields["general.architecture"])
    ft = _reader_value(r.fields["general.file_type"])
    assert info["file_type"] == gguf.LlamaFileType(ft).name
    return info


def _llamacpp_gguf(path):
    """llama.cpp's own parser (gguf_init_from_file in the libggml-base of llama-cpp-python) via ctypes:
    {"tensors": [(name, type id, bytes, absolute offset, shape, elements)], "keys": [(key, type, n)]}.
    GGUFReader needs ~45 s for the demo's 262k-token vocabulary on a loaded machine; this needs 0.2 s."""
    import ctypes
    import glob
    import os

    llama_cpp = pytest.importorskip("llama_cpp")
    libs = glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "**", "libggml-base.so"), recursive=True)
    if not libs:
        pytest.skip("no libggml-base.so in llama_cpp")
    lib = ctypes.CDLL(libs[0])

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]

    vp, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    for fn, res, args in [("gguf_init_from_file", vp, [ctypes.c_char_p, Params]), ("gguf_free", None, [vp]),
                          ("gguf_get_n_tensors", i64, [vp]), ("gguf_get_tensor_name", ctypes.c_char_p, [vp, i64]),
                          ("gguf_get_tensor_type", ctypes.c_int, [vp, i64]), ("gguf_get_tensor_size", sz, [vp, i64]),
                          ("gguf_get_tensor_offset", sz, [vp, i64]), ("gguf_get_data_offset", sz, [vp]),
                          ("gguf_get_n_kv", i64, [vp]), ("gguf_get_key", ctypes.c_char_p, [vp, i64]),
                          ("gguf_get_kv_type", ctypes.c_int, [vp, i64]), ("gguf_get_arr_n", sz, [vp, i64]),
                          ("ggml_get_tensor", vp, [vp, ctypes.c_char_p]), ("ggml_nelements", i64, [vp]),
                          ("ggml_free", None, [vp])]:
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    ctx = ctypes.c_void_p()
    g = lib.gguf_init_from_file(str(path).encode(), Params(True, ctypes.pointer(ctx)))
    assert g, "llama.cpp refused the file"
    base = lib.gguf_get_data_offset(g)
    tensors = []
    for i in range(lib.gguf_get_n_tensors(g)):
        name = lib.gguf_get_tensor_name(g, i)
        t = lib.ggml_get_tensor(ctx, name)
        ne = list((ctypes.c_int64 * 4).from_address(t + 16))  # struct ggml_tensor: type, buffer, ne[4]
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        tensors.append((name.decode(), lib.gguf_get_tensor_type(g, i), lib.gguf_get_tensor_size(g, i),
                        base + lib.gguf_get_tensor_offset(g, i), ne[::-1], lib.ggml_nelements(t)))
    keys = []
    for i in range(lib.gguf_get_n_kv(g)):
        typ = lib.gguf_get_kv_type(g, i)
        keys.append((lib.gguf_get_key(g, i).decode(), typ, lib.gguf_get_arr_n(g, i) if typ == 9 else None))
    lib.gguf_free(g)
    lib.ggml_free(ctx)
    return {"tensors": tensors, "keys": keys}


@pytest.mark.llamacpp
def test_llamacpp_q4_k_m_demo_gguf(demo_gguf):
    from gemmaquant.formats.gguf.reader import TYPE_NAMES

    info = inspect_path(demo_gguf)
    ref = _llamacpp_gguf(demo_gguf)
    ours = [(t["name"], getattr(gguf.GGMLQuantizationType, t["type"]).value, t["bytes"], None, t["shape"],
             t["parameters"]) for t in info["tensors"]]
    assert [o[:3] + o[4:] for o in ours] == [r[:3] + r[4:] for r in ref["tensors"]]
    assert info["parameters"] == sum(r[5] for r in ref["tensors"])
    assert [(k, info["metadata_types"][k]) for k in info["metadata"]] == [(k, TYPE_NAMES[t]) for k, t, _ in ref["keys"]]
    for k, _, n in ref["keys"]:
        v = info["metadata"][k]
        if n is not None:
            assert (v["count"] if isinstance(v, dict) else len(v)) == n
    assert info["file_type"] == "MOSTLY_Q4_K_M"
    assert {"Q4_K", "Q6_K", "F32"} <= set(info["types"])


@pytest.mark.llamacpp
def test_gguf_we_write(our_gguf):
    info = _check_gguf_against_reader(our_gguf)
    ref = _llamacpp_gguf(our_gguf)
    from gemmaquant.formats.gguf.reader import read_gguf_header

    offsets = [t.offset for t in read_gguf_header(our_gguf).tensors]
    assert offsets == [r[3] for r in ref["tensors"]]
    assert info["types"]["Q8_0"] == 7 + 1  # the Linears and the embedding
    assert info["bits_per_weight"] < 9


def test_hf_directory(demo_dir):
    from safetensors import safe_open

    info = inspect_path(demo_dir)
    assert info["kind"] == "hf" and info["model_type"] == "gemma3_text"
    with safe_open(demo_dir / "model.safetensors", "pt") as f:
        ref = {k: f.get_slice(k) for k in f.keys()}
        shapes = {k: list(s.get_shape()) for k, s in ref.items()}
        dtypes = {k: s.get_dtype() for k, s in ref.items()}
    assert {t["name"]: t["shape"] for t in info["tensors"]} == shapes
    assert {t["name"]: t["type"] for t in info["tensors"]} == dtypes
    assert info["parameters"] == sum(math.prod(s) for s in shapes.values())
    assert info["bits_per_weight"] == 16.0
    assert info["gemma"]["text_parameters"] == info["parameters"]
    assert info["quantization_config"] is None


def test_compressed_tensors_output(tiny_dir, tmp_path):
    from safetensors import safe_open

    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.compressed_tensors import write_compressed_tensors
    from gemmaquant.schemes import get_scheme

    out = tmp_path / "tiny-W4A16"
    write_compressed_tensors(Checkpoint(tiny_dir), get_scheme("w4a16"), out, progress=False)
    info = inspect_path(out)
    assert info["kind"] == "compressed-tensors"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert info["quantization_config"]["format"] == qc["format"] == "pack-quantized"
    group = next(iter(qc["config_groups"].values()))
    assert info["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == group["weights"]["num_bits"]
    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        source_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert info["parameters"] == source_params  # packed Linears count their weight_shape, scales count 0
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {t["name"]: t["type"] for t in info["tensors"]} == stored
    packed = [t for t in info["tensors"] if t["name"].endswith(".weight_packed")]
    assert len(packed) == 7 and all(t["type"] == "I32" for t in packed)
    # w4a16 group 128: 4 bits + a bf16 scale per 128 weights
    assert all(t["bits_per_weight"] == 4.0 for t in packed)
    assert info["bits_per_weight"] < 16


def test_cli_json_and_table(our_gguf, capsys):
    res = run_cli(["inspect", our_gguf, "--json"], capsys)
    assert res.code == 0
    data = json.loads(res.stdout)
    assert data["tensor_count"] == len(gguf.GGUFReader(our_gguf).tensors)
    res = run_cli(["inspect", our_gguf], capsys)
    assert res.code == 0 and "token_embd.weight" in res.stdout and "Q8_0" in res.stdout


def test_truncated_gguf_names_the_tensor_and_offset(our_gguf, tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(our_gguf.read_bytes()[: our_gguf.stat().st_size - 1000])
    with pytest.raises(GemmaQuantError, match=r"tensor '.*' .*byte offset \d+.*truncated"):
        inspect_path(bad)
    res = run_cli(["inspect", bad], capsys)
    assert res.code == 2 and "Traceback" not in res.stderr and "truncated" in res.stderr


def test_huge_claims_do_not_allocate(tmp_path):
    import struct

    p = tmp_path / "huge.gguf"
    # one key whose string value claims 2^60 bytes
    key = b"general.name"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                  + struct.pack("<IQ", 8, 1 << 60) + b"x" * 64)
    with pytest.raises(GemmaQuantError, match=r"'general.name' at byte offset 56: needs \d+ bytes"):
        inspect_path(p)
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**12, 10**12) + b"\0" * 64)
    with pytest.raises(GemmaQuantError, match="claims 1000000000000 keys"):
        inspect_path(p)
    # an array of 10^12 uint32 in a 100-byte file
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"abc"
                  + struct.pack("<IIQ", 9, 4, 10**12) + b"\0" * 64)
    with pytest.raises(GemmaQuantError, match=r"1000000000000 × uint32"):
        inspect_path(p)


def test_not_a_model(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(GemmaQuantError, match="not a GGUF file"):
        inspect_path(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GemmaQuantError, match="the directory is empty"):
        inspect_path(tmp_path / "empty")
    with pytest.raises(GemmaQuantError, match="no such file"):
        inspect_path(tmp_path / "missing")


def test_float_values_are_json(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "f.gguf", "gemma3")
    w.add_float32("x.nan", float("nan"))
    w.add_array("x.long", list(range(100)))
    w.add_tensor("t", np.zeros((2, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = inspect_path(tmp_path / "f.gguf")
    json.dumps(info, allow_nan=False)
    assert info["metadata"]["x.long"] == {"array": "int32", "count": 100, "first": [0, 1, 2, 3]}
    assert info["tensors"][0] == {"name": "t", "type": "F32", "shape": [2, 32], "bytes": 256, "parameters": 64,
                                  "bits_per_weight": 32.0}
