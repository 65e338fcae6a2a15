"""write_gguf_set: several presets of one checkpoint from one pass over it.

Each file against llama-quantize's (slow tier); each source slab read and converted once and quantized
once per distinct type the presets give its tensor (calls counted in this process and in the forked
workers, through a log file); a failure or Ctrl-C half-way leaves none of the files or temporaries; the
headers of a set equal each preset's own.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.export.gguf import workers, writer
from gemmaquant.export.gguf.header import HeaderSpec, header_bytes, header_set_bytes
from gemmaquant.export.gguf.plan import plan_types
from gemmaquant.export.gguf.writer import SLAB_VALUES, GGUFOutput, write_gguf_set
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.schemes import get_scheme

from . import llamacpp_ref as ref

# presets that share most tensors' types (Q4_K, Q5_K, Q6_K, Q8_0): the set quantizes each once
SHARED = ["q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s"]
PROCS = pytest.param(2, marks=pytest.mark.subprocess, id="processes")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return Checkpoint(ref.random_gemma3_256(tmp_path_factory.mktemp("wset") / "tiny-gemma3-256"))


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    """The same layout saved by transformers, and llama.cpp's converter's bf16 GGUF of it."""
    pytest.importorskip("transformers")
    d = ref.tiny_checkpoint("gemma3-256", tmp_path_factory.mktemp("wset-ref") / "tiny-gemma3-256-1M")
    return d, ref.convert(d, "bf16")


def _imatrix(config) -> tuple[dict, dict]:
    """Positive importance for every 2-D tensor but token_embd (llama-imatrix never sees it), and its keys."""
    g = torch.Generator().manual_seed(3)
    sums = {p.name: torch.rand(p.n_per_row, generator=g) * 50 + 0.01
            for p in plan_types(config, "q8_0", False) if len(p.shape) == 2 and p.name != "token_embd.weight"}
    return sums, {"file": "im.gguf", "dataset": "calib.txt", "entries_count": len(sums), "chunks_count": 3}


@pytest.mark.llamacpp
@pytest.mark.subprocess
@pytest.mark.parametrize("presets,with_imatrix", [
    (["bf16", "q8_0", "q6_k", "q4_k_m", "q4_k_s", "q3_k_m", "iq4_xs", "q2_k"], False),
    (["q4_k_m", "q4_k_s", "iq2_xxs", "q2_k_s", "q4_0"], True),  # iq2_xxs / q2_k_s: refused without one
])
def test_each_file_of_a_set_is_llama_quantizes(tiny256, tmp_path, presets, with_imatrix):
    d, bf16 = tiny256
    ck = Checkpoint(d)
    im, meta = _imatrix(ck.config) if with_imatrix else (None, None)
    reps = write_gguf_set(ck, [GGUFOutput(p, tmp_path / "set" / f"{p}.gguf", im, meta) for p in presets], workers=2)
    assert [r.scheme for r in reps] == presets
    for p, rep in zip(presets, reps):
        want = ref.quantize(bf16, tmp_path / f"ref.{p}.gguf", get_scheme(p).ftype,
                            imatrix=None if im is None else {k: v.numpy() for k, v in im.items()}, meta=meta)
        assert rep.file_bytes == want.stat().st_size, p
        assert rep.path.read_bytes() == want.read_bytes(), p


def _spy(monkeypatch, log):
    """Log every slab (`quantize_rows`), conversion and quantizer call to `log`, one line each, from this
    process and from forked workers (appends of one short line are atomic)."""
    def write(line):
        with open(log, "a") as f:
            f.write(line + "\n")

    real_rows, real_convert, real_quantize = workers.quantize_rows, workers.convert_rows, workers.quantize

    def rows(where, w, view, r0):
        write(f"slab {w.plan.name} {r0} {view.shape[0]}")
        return real_rows(where, w, view, r0)

    def convert(where, p, view, f32):
        write(f"convert {p.name}")
        return real_convert(where, p, view, f32)

    def quantize(x, t, qw=None):
        write(f"quantize {t.name}")
        return real_quantize(x, t, qw)

    monkeypatch.setattr(workers, "quantize_rows", rows)  # in the workers
    monkeypatch.setattr(writer, "quantize_rows", rows)  # the writer's own slab jobs (threads)
    monkeypatch.setattr(workers, "convert_rows", convert)
    monkeypatch.setattr(workers, "quantize", quantize)


@pytest.mark.parametrize("n_workers", [1, PROCS])
def test_each_slab_is_read_and_converted_once_and_each_type_quantized_once(ckpt, tmp_path, monkeypatch, n_workers):
    log = tmp_path / "calls.log"
    _spy(monkeypatch, log)
    reads = Counter()
    real_tensor = Checkpoint.tensor
    monkeypatch.setattr(Checkpoint, "tensor", lambda self, name: reads.update([name]) or real_tensor(self, name))
    reps = write_gguf_set(ckpt, [GGUFOutput(p, tmp_path / f"{p}.gguf") for p in SHARED], workers=n_workers)
    lines = log.read_text().splitlines()
    plans = [plan_types(ckpt.config, p, False) for p in SHARED]
    weights = [i for i, p in enumerate(plans[0]) if len(p.shape) == 2]
    # the slabs: each tensor's rows once, no slab twice
    slabs = Counter(tuple(x.split()[1:]) for x in lines if x.startswith("slab "))
    assert max(slabs.values()) == 1
    for i in weights:
        p = plans[0][i]
        got = sorted((int(r0), int(n)) for name, r0, n in slabs if name == p.name)
        step = max(1, SLAB_VALUES // p.n_per_row)
        assert got == [(r, min(step, p.shape[0] - r)) for r in range(0, p.shape[0], step)], p.name
    assert len(slabs) == sum(1 for x in lines if x.startswith("convert "))  # one conversion per slab
    # one quantizer call per slab and distinct type (the Gemma 3 tensors are 1 slab each here)
    distinct = Counter(t for i in weights for t in {pl[i].type.name for pl in plans})
    assert Counter(x.split()[1] for x in lines if x.startswith("quantize ")) == distinct
    assert sum(distinct.values()) < len(SHARED) * len(weights)  # the presets do share types
    if n_workers == 1:  # every checkpoint tensor fetched once (the workers open their own mapping)
        assert set(reads.values()) == {1} and set(reads) == {p.hf_name for p in plans[0] if p.hf_name}
    assert [r.path.name for r in reps] == [f"{p}.gguf" for p in SHARED]


@pytest.mark.parametrize("how", ["error", "interrupt"])
@pytest.mark.parametrize("n_workers", [1, PROCS])
def test_a_failure_half_way_leaves_none_of_the_files(ckpt, tmp_path, monkeypatch, how, n_workers):
    real_rows = workers.quantize_rows

    def rows(where, w, view, r0):
        if how == "error" and w.plan.name == "blk.1.ffn_down.weight":  # the last layer: most bytes written
            raise GemmaQuantError("boom")
        return real_rows(where, w, view, r0)

    def progress(done, total, tensor):
        if how == "interrupt" and tensor == "blk.1.attn_q.weight":
            raise KeyboardInterrupt

    monkeypatch.setattr(workers, "quantize_rows", rows)
    monkeypatch.setattr(writer, "quantize_rows", rows)
    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for d in (mine, tmp_path / "new" / "dir"):
        outs = [GGUFOutput(p, d / f"{p}.gguf") for p in ["q8_0", "q4_k_m", "q4_k_s", "q3_k_m"]]
        with pytest.raises(GemmaQuantError if how == "error" else KeyboardInterrupt):
            write_gguf_set(ckpt, outs, workers=n_workers, progress=progress)
    assert sorted(os.listdir(mine)) == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "new").exists()


def test_headers_of_a_set_are_each_presets_own(ckpt):
    """The set's header process reads the vocabulary once and finishes a copy per preset: no key of one
    preset (file type, imatrix keys, extra keys) may leak into another's."""
    im, meta = _imatrix(ckpt.config)
    specs = [HeaderSpec(get_scheme("q4_k_m"), plan_types(ckpt.config, "q4_k_m", False)),
             HeaderSpec(get_scheme("iq2_xxs"), plan_types(ckpt.config, "iq2_xxs", True), meta),
             HeaderSpec(get_scheme("q6_k"), plan_types(ckpt.config, "q6_k", False), None, {"gemmaquant.x": "y"}),
             HeaderSpec(get_scheme("bf16"), plan_types(ckpt.config, "bf16", False))]
    got = header_set_bytes(ckpt.path, ckpt.config, specs)
    for s, (head, kv) in zip(specs, got):
        want_head, want_kv = header_bytes(ckpt.path, ckpt.config, s.scheme, s.plans, s.imatrix_meta, s.extra_kv)
        assert head == want_head and list(kv) == list(want_kv), s.scheme.name
    assert len({h for h, _ in got}) == len(specs)


def test_a_set_refuses_before_writing_anything(ckpt, tmp_path):
    d = tmp_path / "out"
    with pytest.raises(GemmaQuantError, match="iq2_xxs"):  # needs an imatrix: refused before any file
        write_gguf_set(ckpt, [GGUFOutput("q8_0", d / "a.gguf"), GGUFOutput("iq2_xxs", d / "b.gguf")], workers=1)
    with pytest.raises(GemmaQuantError, match="the same output twice"):
        write_gguf_set(ckpt, [GGUFOutput("q8_0", d / "a.gguf"), GGUFOutput("q6_k", d / "a.gguf")], workers=1)
    assert not d.exists()
