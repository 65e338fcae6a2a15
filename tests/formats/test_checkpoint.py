"""Loading: lazy shards, and bad input that must give one clear error naming the file/tensor."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.formats.checkpoint import resolve_model
from gemmaquant.formats.config import config_from_dict
from gemmaquant.errors import GemmaQuantError

CFG = {"model_type": "gemma", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
       "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}


def write_ckpt(d, cfg=CFG, shards=1, dtype=torch.bfloat16):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    shapes = config_from_dict(cfg).expected_shapes()
    tensors = {n: torch.randn(s).to(dtype) for n, s in shapes.items()}
    if shards == 1:
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return tensors
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        part = {n: tensors[n] for n in names[k::shards]}
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, d / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def test_sharded_checkpoint_reads_every_tensor(tmp_path):
    tensors = write_ckpt(tmp_path / "m", shards=3)
    ck = Checkpoint(tmp_path / "m")
    assert sorted(ck.names()) == sorted(tensors)
    for n, t in tensors.items():
        assert torch.equal(ck.tensor(n), t)


def test_multimodal_prefixes_are_stripped(tmp_path):
    d = tmp_path / "mm"
    d.mkdir()
    g3 = {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
          "sliding_window": 4}
    (d / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": g3}))
    shapes = config_from_dict(g3).expected_shapes()
    tensors = {"model.language_model." + n[len("model."):]: torch.zeros(s) for n, s in shapes.items()}
    tensors["model.vision_tower.patch.weight"] = torch.zeros(3)
    save_file(tensors, d / "model.safetensors")
    ck = Checkpoint(d)
    assert ck.config.multimodal and "model.layers.0.self_attn.q_norm.weight" in ck.names()
    assert not any("vision" in n for n in ck.names())


def _error(path) -> str:
    with pytest.raises(GemmaQuantError) as e:
        Checkpoint(path)
    return str(e.value)


def test_missing_and_empty_directory(tmp_path):
    assert "no such directory" in _error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "empty" in _error(tmp_path / "empty")


def test_config_not_json_and_not_gemma(tmp_path):
    write_ckpt(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _error(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(CFG, model_type="llama")))
    msg = _error(tmp_path / "m")
    assert "'llama'" in msg and "gemma2" in msg


def test_shapes_that_contradict_the_config(tmp_path):
    write_ckpt(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(CFG, intermediate_size=40)))
    msg = _error(tmp_path / "m")
    assert "mlp." in msg and "[40, 32]" in msg or "[32, 40]" in msg


def test_truncated_safetensors(tmp_path):
    write_ckpt(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    msg = _error(tmp_path / "m")
    assert "model.safetensors" in msg and "truncated" in msg


def test_header_length_lies(tmp_path):
    write_ckpt(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    f.write_bytes(bytes(data))
    assert "header length" in _error(tmp_path / "m")


def _rewrite_header(f, mutate):
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_overlapping_offsets_and_bad_dtype(tmp_path):
    write_ckpt(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    orig = f.read_bytes()

    def overlap(h):
        names = sorted(k for k in h if k != "__metadata__" and h[k]["shape"] == [32])
        a, b = names[:2]
        h[b]["data_offsets"] = h[a]["data_offsets"]
    _rewrite_header(f, overlap)
    assert "overlap" in _error(tmp_path / "m")
    f.write_bytes(orig)
    _rewrite_header(f, lambda h: h["model.norm.weight"].update(dtype="Q4"))
    msg = _error(tmp_path / "m")
    assert "model.norm.weight" in msg and "'Q4'" in msg and "BF16" in msg


def test_index_naming_a_missing_shard_or_escaping_the_directory(tmp_path):
    write_ckpt(tmp_path / "m", shards=2)
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in _error(tmp_path / "m")
    write_ckpt(tmp_path / "t", shards=2)
    idx = tmp_path / "t" / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../etc/passwd"
    idx.write_text(json.dumps(data))
    assert "not a plain file name" in _error(tmp_path / "t")


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path):
    d = tmp_path / "pk"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04this would be a pickle")
    msg = _error(d)
    assert "pickle" in msg and "never unpickles" in msg


def test_nan_weights_are_named_when_loading(tmp_path):
    from gemmaquant.model.loading import load_model

    t = write_ckpt(tmp_path / "m", dtype=torch.float32)
    t["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(t, tmp_path / "m" / "model.safetensors")
    with pytest.raises(GemmaQuantError, match="model.layers.1.mlp.up_proj.weight.*NaN"):
        load_model(Checkpoint(tmp_path / "m"))


def test_offline_repo_id_that_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(GemmaQuantError, match="not in the Hugging Face cache"):
        resolve_model("google/gemma-2-2b-it")
