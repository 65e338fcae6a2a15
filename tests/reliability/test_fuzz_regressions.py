"""Inputs found by benchmarks/fuzz_readers.py (or written while reading its targets) that once crashed a
reader with something other than GemmaQuantError. Each must now fail with one clear GemmaQuantError.

Cases marked xfail(strict) are open bugs in modules this suite does not own; when one is fixed the
test XPASSes, which fails the run as a reminder to drop the marker.
"""

from __future__ import annotations

import json
import struct

import pytest

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.errors import GemmaQuantError
from gemmaquant.formats.gguf.reader import read_gguf_header
from gemmaquant.formats.safetensors import SafetensorsFile

from ..formats.test_checkpoint import write_ckpt


def _st(tmp_path, header: bytes, body: int = 16):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * body)
    return p


def _gguf_string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _gguf(tmp_path, *kvs: bytes) -> object:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs) + b"\0" * 32)
    return p


# -- safetensors_io ----------------------------------------------------------------------------------
@pytest.mark.parametrize("header,match", [
    # dtype was looked up in a dict before its type was checked: TypeError unhashable list
    ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "unsupported dtype"),
    ({"a": {"dtype": {"x": 1}, "shape": [1], "data_offsets": [0, 4]}}, "unsupported dtype"),
    # booleans passed as ints in shapes and offsets
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}}, "bad data_offsets"),
    # a __metadata__ that is not an object was kept and broke later `.get` calls
    ({"__metadata__": [1, 2]}, "__metadata__"),
])
def test_safetensors_header_values(tmp_path, header, match):
    with pytest.raises(GemmaQuantError, match=match):
        SafetensorsFile(_st(tmp_path, json.dumps(header).encode()))


def test_safetensors_deeply_nested_header(tmp_path):
    """json.loads raises RecursionError (not JSONDecodeError) past ~1000 levels."""
    with pytest.raises(GemmaQuantError, match="nested too deeply"):
        SafetensorsFile(_st(tmp_path, b"[" * 50_000 + b"]" * 50_000))


# -- checkpoint index -----------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_map", [
    {"model.norm.weight": {"x": 1}},  # set(weight_map.values()): TypeError unhashable dict
    {"model.norm.weight": ["model.safetensors"]},
    {"model.norm.weight": 7},
])
def test_index_with_non_string_shards(tmp_path, weight_map):
    d = tmp_path / "m"
    write_ckpt(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(GemmaQuantError, match="not a valid index"):
        Checkpoint(d)


def test_index_deeply_nested(tmp_path):
    d = tmp_path / "m"
    write_ckpt(d)
    (d / "model.safetensors.index.json").write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(GemmaQuantError, match="not a valid index"):
        Checkpoint(d)


# -- gguf_header (inspect) ----------------------------------------------------------------------------
def test_gguf_header_error_inside_a_string_closes_cleanly(tmp_path):
    """The mmap was closed while a memoryview slice of it lived on in the traceback: BufferError
    instead of the error. Trigger: a key that is not UTF-8."""
    p = _gguf(tmp_path, _gguf_string(b"bad\xff") + struct.pack("<IB", 0, 1))
    with pytest.raises(GemmaQuantError, match=r"metadata key #0 at byte offset 24: string is not valid UTF-8"):
        read_gguf_header(p)


def test_gguf_header_nested_arrays_and_bad_alignment(tmp_path):
    nested = _gguf_string(b"x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0)
    with pytest.raises(GemmaQuantError, match="nested more than"):
        read_gguf_header(_gguf(tmp_path, nested))
    align = _gguf_string(b"general.alignment") + struct.pack("<I", 8) + _gguf_string(b"abc")
    with pytest.raises(GemmaQuantError, match="must be a uint32 power of two, got string 'abc'"):
        read_gguf_header(_gguf(tmp_path, align))


# -- open bugs in modules this suite does not own ----------------------------------------------------------
@pytest.mark.parametrize("kv", [
    _gguf_string(b"general.alignment") + struct.pack("<I", 8) + _gguf_string(b"abc"),
    _gguf_string(b"x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0),
])
def test_gguf_file_alignment_and_nesting(tmp_path, kv):
    from gemmaquant.formats.gguf.reader import GGUFFile

    with pytest.raises(GemmaQuantError):
        GGUFFile(_gguf(tmp_path, kv))


@pytest.mark.parametrize("key,value", [("max_position_embeddings", [1]), ("max_position_embeddings", "abc"),
                                       ("layer_types", 5)])
def test_config_value_types(key, value):
    from gemmaquant.formats.config import config_from_dict

    cfg = {"model_type": "gemma", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, key: value}
    with pytest.raises(GemmaQuantError):
        config_from_dict(cfg)


def test_config_deeply_nested(tmp_path):
    from gemmaquant.formats.config import load_config

    (tmp_path / "config.json").write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(GemmaQuantError):
        load_config(tmp_path)
