"""GGUFPatcher (export/gguf/patch.py): tensors replaced in place, the rest of the template byte for byte,
and a scratch template moved, not copied (the disk a --algorithm gptq run needs is one file's)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gemmaquant.errors import GemmaQuantError
from gemmaquant.export.gguf import patch as patch_mod
from gemmaquant.export.gguf.patch import GGUFPatcher
from gemmaquant.export.gguf.writer import write_gguf
from gemmaquant.formats.checkpoint import Checkpoint

from tests.reliability import write_tiny

NAME = "blk.0.ffn_down.weight"


@pytest.fixture(scope="module")
def template_bytes(tmp_path_factory):
    d = tmp_path_factory.mktemp("patch")
    write_tiny(d / "tiny", seed=3)
    out = d / "t.gguf"
    write_gguf(Checkpoint(d / "tiny"), "q8_0", out)
    return out.read_bytes()


def _patched(tmp_path, template_bytes, consume, monkeypatch=None, cross_fs=False):
    from gguf import GGUFReader

    t = tmp_path / "scratch" / "template.gguf"
    t.parent.mkdir()
    t.write_bytes(template_bytes)
    ref = GGUFReader(str(t))
    info = next(x for x in ref.tensors if x.name == NAME)
    new = (np.asarray(info.data).view(np.uint8).reshape(-1) ^ 0x01).copy()  # flips the low bit of every byte
    offset = int(info.data_offset)
    del ref
    copies = []
    if monkeypatch is not None:
        real_copy = patch_mod.shutil.copyfile
        monkeypatch.setattr(patch_mod.shutil, "copyfile", lambda a, b: copies.append(a) or real_copy(a, b))
        if cross_fs:
            real_replace = os.replace

            def no_rename(a, b):  # only the template's move crosses a filesystem, not the final rename
                if os.fspath(a) == os.fspath(t):
                    raise OSError(18, "Invalid cross-device link")
                return real_replace(a, b)
            monkeypatch.setattr(patch_mod.os, "replace", no_rename)
    out = tmp_path / "out.gguf"
    with GGUFPatcher(t, out, consume=consume) as p:
        p.write(NAME, new)
    got = out.read_bytes()
    want = bytearray(template_bytes)
    want[offset:offset + new.nbytes] = new.tobytes()
    assert got == bytes(want)
    return t, copies


def test_copy_keeps_the_template(tmp_path, template_bytes, monkeypatch):
    t, copies = _patched(tmp_path, template_bytes, consume=False, monkeypatch=monkeypatch)
    assert t.read_bytes() == template_bytes and copies == [t]


def test_consume_moves_the_template_without_a_copy(tmp_path, template_bytes, monkeypatch):
    t, copies = _patched(tmp_path, template_bytes, consume=True, monkeypatch=monkeypatch)
    assert not t.exists() and copies == []


def test_consume_across_filesystems_copies(tmp_path, template_bytes, monkeypatch):
    t, copies = _patched(tmp_path, template_bytes, consume=True, monkeypatch=monkeypatch, cross_fs=True)
    assert copies == [t]


def test_a_failed_patch_leaves_no_output(tmp_path, template_bytes):
    t = tmp_path / "template.gguf"
    t.write_bytes(template_bytes)
    out = tmp_path / "out.gguf"
    with pytest.raises(GemmaQuantError, match="bytes given"):
        with GGUFPatcher(t, out, consume=True) as p:
            p.write(NAME, np.zeros(3, dtype=np.uint8))
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # the moved scratch template went with the temporary
