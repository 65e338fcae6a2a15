"""Reading and writing llama.cpp importance-matrix files.

Layouts follow tools/imatrix/imatrix.cpp and common/imatrix-loader.cpp (docs/gguf-gemma.md §5); the
GGUF container is checked with the gguf package's reader. How llama-quantize *uses* what we read is
tested end to end in test_writer.py (byte equality with libllama given the same importance).
"""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.formats.gguf.imatrix import read_imatrix, write_imatrix


def _legacy(entries, tail=None) -> bytes:
    """Hand-written legacy .dat: i32 n; per entry i32 len, name, i32 ncall, i32 nval, f32[nval]."""
    out = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(vals))
        out += np.asarray(vals, dtype="<f4").tobytes()
    if tail is not None:
        chunks, dataset = tail
        out += struct.pack("<ii", chunks, len(dataset)) + dataset.encode()
    return out


def test_gguf_layout_is_llama_imatrix_s(tmp_path):
    p = tmp_path / "imatrix.gguf"
    sums = {"blk.1.ffn_down.weight": torch.arange(8, dtype=torch.float32),
            "blk.0.attn_q.weight": torch.ones(4) * 3}
    write_imatrix(p, sums, {"blk.1.ffn_down.weight": 4, "blk.0.attn_q.weight": 0},
                  datasets=["a.txt", "b.txt"], chunk_count=7, chunk_size=512)
    r = gguf.GGUFReader(p)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["a.txt", "b.txt"]
    assert r.fields["imatrix.chunk_count"].contents() == 7
    assert r.fields["imatrix.chunk_size"].contents() == 512
    assert [(t.name, t.tensor_type.name, t.shape.tolist()) for t in r.tensors] == [
        ("blk.0.attn_q.weight.in_sum2", "F32", [4]), ("blk.0.attn_q.weight.counts", "F32", [1]),
        ("blk.1.ffn_down.weight.in_sum2", "F32", [8]), ("blk.1.ffn_down.weight.counts", "F32", [1])]

    im = read_imatrix(p)
    assert not im.legacy and im.datasets == ["a.txt", "b.txt"] and im.chunk_count == 7
    # in_sum2 / count; a zero count gives 1.0 for every column
    assert torch.equal(im.importance["blk.1.ffn_down.weight"], torch.arange(8, dtype=torch.float32) / 4)
    assert torch.equal(im.importance["blk.0.attn_q.weight"], torch.ones(4))
    assert im.meta() == {"file": str(p), "dataset": "a.txt", "entries_count": 2, "chunks_count": 7}


def test_gguf_with_several_matrices(tmp_path):
    p = tmp_path / "moe.gguf"
    write_imatrix(p, {"w": torch.tensor([[2.0, 4.0], [6.0, 9.0]])}, {"w": [2, 3]},
                  datasets=["d"], chunk_count=1, chunk_size=8)
    r = gguf.GGUFReader(p)
    assert [t.shape.tolist() for t in r.tensors] == [[2, 2], [1, 2]]  # ne=(n, n_mat) and (1, n_mat)
    assert torch.equal(read_imatrix(p).importance["w"], torch.tensor([1.0, 2.0, 2.0, 3.0]))


def test_legacy_dat(tmp_path):
    p = tmp_path / "imatrix.dat"
    p.write_bytes(_legacy([("blk.0.ffn_up.weight", 4, [4.0, 8.0, 2.0]), ("blk.0.attn_v.weight", 0, [5.0])],
                          tail=(12, "calib.txt")))
    im = read_imatrix(p)
    assert im.legacy and im.chunk_count == 12 and im.datasets == ["calib.txt"]
    assert torch.equal(im.importance["blk.0.ffn_up.weight"], torch.tensor([1.0, 2.0, 0.5]))  # values / ncall
    assert torch.equal(im.importance["blk.0.attn_v.weight"], torch.tensor([5.0]))  # ncall 0: as stored
    p.write_bytes(_legacy([("x", 1, [1.0])]))  # the tail is optional
    im = read_imatrix(p)
    assert im.chunk_count == 0 and im.datasets == [] and im.meta()["chunks_count"] == 0


@pytest.mark.parametrize("data,match", [
    (b"", "truncated"),
    (struct.pack("<i", 0), "no entries"),
    (_legacy([("x", 1, [1.0])])[:-2], "bad value count"),
    (_legacy([("x", 1, [float("nan")])]), "non-finite"),
])
def test_bad_legacy_files(tmp_path, data, match):
    p = tmp_path / "bad.dat"
    p.write_bytes(data)
    with pytest.raises(GemmaQuantError, match=match):
        read_imatrix(p)


def test_gguf_without_imatrix_metadata_is_refused(tmp_path):
    p = tmp_path / "plain.gguf"
    w = gguf.GGUFWriter(p, "gemma3")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones(4, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.ones(1, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GemmaQuantError, match="missing imatrix metadata"):
        read_imatrix(p)


def test_missing_file(tmp_path):
    with pytest.raises(GemmaQuantError, match="no such imatrix"):
        read_imatrix(tmp_path / "nope.dat")
