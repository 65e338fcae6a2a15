"""write_gguf against llama.cpp's pipeline: convert_hf_to_gguf.py (bf16) then llama-quantize.

Default run: tiny random Gemma 1/2/3 checkpoints (transformers init, bf16, small SentencePiece vocab),
every preset byte-compared for Gemma 3 and six for Gemma 1/2, the K-quants without fallback on
256-wide models, an imatrix, plus llama.cpp loading and running the files. GEMMAQUANT_DEMO_GGUF=1 adds the real demo model (Gemma 3 270M): bf16 against the converter
and every preset byte for byte (a few minutes).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.errors import GemmaQuantError, OutputError
from gemmaquant.export.gguf.writer import write_gguf
from gemmaquant.schemes import get_scheme
from tests.llamacpp import open_llama

from . import llamacpp_ref as ref

ALL = ["bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q4_0"]
SOME = ["bf16", "f16", "q8_0", "q6_k", "q4_k_m", "q4_0"]
DEMO = os.environ.get("GEMMAQUANT_DEMO_GGUF") == "1"
SLOW = os.environ.get("GEMMAQUANT_SLOW_GGUF") == "1"  # more K-quant cases (tens of seconds each)
# Every test here compares with llama.cpp's pipeline or starts from the `tiny` fixture, which runs
# llama.cpp's converter on the checkpoints (in a child process): the slow tier.
pytestmark = [pytest.mark.llamacpp, pytest.mark.subprocess]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (checkpoint dir, convert_hf_to_gguf.py bf16 output), built once."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny")
    kinds = ("gemma1", "gemma2", "gemma3", "gemma2-256", "gemma3-256")
    dirs = [ref.tiny_checkpoint(kind, root / f"tiny-{kind}-1M") for kind in kinds]
    refs = ref.convert_many([(d, "bf16") for d in dirs])
    return dict(zip(kinds, zip(dirs, refs)))


@pytest.mark.parametrize("kind", ["gemma1", "gemma2", "gemma3"])
def test_bf16_same_keys_values_and_tensors_as_the_converter(tiny, tmp_path, kind):
    d, ref_bf16 = tiny[kind]
    ours = write_gguf(Checkpoint(d), "bf16", tmp_path / "ours.gguf").path
    want_kv, want_t = ref.kv_and_tensors(ref_bf16)
    got_kv, got_t = ref.kv_and_tensors(ours)
    assert got_kv == want_kv
    assert got_t == want_t


@pytest.mark.parametrize("kind,preset", [("gemma3", p) for p in ALL]
                         + [(k, p) for k in ("gemma1", "gemma2") for p in SOME]
                         + [("gemma3-256", "q6_k")]
                         + ([("gemma2-256", "q4_k_m"), ("gemma2-256", "q6_k"), ("gemma3-256", "q4_k_m")] if SLOW else []))
def test_file_identical_to_convert_then_quantize(tiny, tmp_path, kind, preset):
    pytest.importorskip("llama_cpp")
    d, ref_bf16 = tiny[kind]
    want = ref.quantize(ref_bf16, tmp_path / "ref.gguf", get_scheme(preset).ftype).read_bytes()
    got = write_gguf(Checkpoint(d), preset, tmp_path / "ours.gguf").path.read_bytes()
    assert len(got) == len(want)
    assert got == want


@pytest.mark.parametrize("preset", ["q4_k_m", "q4_0"] + (["q6_k"] if SLOW else []))
def test_imatrix_file_identical_to_llama_quantize(tiny, tmp_path, preset):
    """An imatrix changes the bytes (the *_impl quantizers), Q4_0's ffn_down types and the keys."""
    pytest.importorskip("llama_cpp")
    import torch

    from gemmaquant.formats.gguf.imatrix import read_imatrix, write_imatrix
    from gemmaquant.export.gguf.plan import plan_types

    d, ref_bf16 = tiny["gemma3-256"]
    ck = Checkpoint(d)
    g = torch.Generator().manual_seed(1)
    sums = {p.name: torch.rand(p.n_per_row, generator=g) * 50
            for p in plan_types(ck.config, "q8_0", False) if len(p.shape) == 2 and p.name != "token_embd.weight"}
    path = tmp_path / "im.gguf"
    write_imatrix(path, sums, {k: 10 for k in sums}, datasets=["wiki.txt"], chunk_count=3, chunk_size=512)
    im = read_imatrix(path)
    want = ref.quantize(ref_bf16, tmp_path / "ref.gguf", get_scheme(preset).ftype,
                        imatrix={k: v.numpy() for k, v in im.importance.items()}, meta=im.meta()).read_bytes()
    rep = write_gguf(ck, preset, tmp_path / "ours.gguf", imatrix=im.importance, imatrix_meta=im.meta())
    assert rep.path.read_bytes() == want
    assert len(rep.imatrix_used) == len(sums)


@pytest.mark.parametrize("kind", ["gemma1", "gemma2", "gemma3"])
@pytest.mark.parametrize("preset", ["bf16", "q4_k_m", "q4_0"])
def test_llama_cpp_loads_and_runs(tiny, tmp_path, kind, preset):
    path = write_gguf(Checkpoint(tiny[kind][0]), preset, tmp_path / "ours.gguf").path
    llm = open_llama(path, n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    toks = llm.tokenize(b"abc  de")
    assert toks[0] == 2  # add_bos_token
    assert 264 in toks  # the USER_DEFINED "  " (two spaces) is one token, as in HF
    llm.eval(toks)
    assert np.isfinite(np.asarray(llm.scores[: len(toks)])).all()


def test_refuses_existing_output_and_unknown_preset(tiny, tmp_path):
    ck = Checkpoint(tiny["gemma3"][0])
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="exists"):
        write_gguf(ck, "q8_0", out)
    assert out.read_bytes() == b"keep"
    with pytest.raises(GemmaQuantError, match="allowed: .*q4_k_m"):
        write_gguf(ck, "q3_k_xl", tmp_path / "y.gguf")
    assert not (tmp_path / "y.gguf").exists()
    write_gguf(ck, "q8_0", out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]  # no temporary left behind


def test_wrong_sized_imatrix_entry_is_an_error(tiny, tmp_path):
    import torch

    ck = Checkpoint(tiny["gemma3"][0])
    with pytest.raises(GemmaQuantError, match="blk.0.ffn_down.weight.*7 values"):
        write_gguf(ck, "q4_k_m", tmp_path / "z.gguf", imatrix={"blk.0.ffn_down.weight": torch.ones(7)})
    assert not list(tmp_path.iterdir())


# -- the real demo model (Gemma 3 270M), opt-in -----------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not DEMO:
        pytest.skip("set GEMMAQUANT_DEMO_GGUF=1 to run the Gemma 3 270M comparisons (minutes)")
    from gemmaquant.formats.demo import ensure_demo_checkpoint

    d = ensure_demo_checkpoint()
    return d, ref.convert(d, "bf16")


def test_demo_bf16_matches_the_converter(demo, tmp_path):
    pytest.importorskip("llama_cpp")
    d, ref_bf16 = demo
    ours = write_gguf(Checkpoint(d), "bf16", tmp_path / "ours.gguf").path
    assert ref.kv_and_tensors(ours) == ref.kv_and_tensors(ref_bf16)
    assert ours.read_bytes() == ref.quantize(ref_bf16, tmp_path / "r.gguf", 32).read_bytes()


@pytest.mark.parametrize("preset", [p for p in ALL if p != "bf16"])
def test_demo_presets_identical(demo, tmp_path, preset):
    d, ref_bf16 = demo
    want = ref.quantize(ref_bf16, tmp_path / "ref.gguf", get_scheme(preset).ftype)
    got = write_gguf(Checkpoint(d), preset, tmp_path / "ours.gguf").path
    assert got.stat().st_size == want.stat().st_size
    assert got.read_bytes() == want.read_bytes()


def test_verify_reads_what_gguf_reader_reads_and_catches_corruption(tiny, tmp_path):
    """The read-back check uses our own reader (fast); it must see exactly what gguf.GGUFReader
    sees, and fail, naming the key or tensor, when the file differs from the intent."""
    import gguf

    from gemmaquant.export.gguf.header import header_bytes
    from gemmaquant.export.gguf.plan import plan_types
    from gemmaquant.export.gguf.verify import verify_file

    d, _ = tiny["gemma3"]
    ck = Checkpoint(d)
    rep = write_gguf(ck, "q4_k_m", tmp_path / "a.gguf")
    s = get_scheme("q4_k_m")
    plans = plan_types(ck.config, s, False, has_lm_head=False)
    _, kv = header_bytes(ck.path, ck.config, s, plans, None)
    assert verify_file(rep.path, kv, plans, rep.crc32) == len(kv)

    from gemmaquant.formats.gguf.reader import GGUFFile
    ours, theirs = GGUFFile(rep.path), gguf.GGUFReader(rep.path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for k, f in fields.items():
        assert ours.types[k] == (int(f.types[0]), int(f.types[-1]) if len(f.types) > 1 else None), k
        got = ours.metadata[k]
        assert (got.tolist() if isinstance(got, np.ndarray) else got) == f.contents(), k
    assert [(t.name, int(t.data_offset)) for t in theirs.tensors] == [(t.name, t.offset) for t in ours.tensors.values()]
    ours.close()

    bad_kv = dict(kv)
    key = "gemma3.attention.head_count"
    bad_kv[key] = gguf.GGUFValue(kv[key].value + 1, kv[key].type)
    with pytest.raises(GemmaQuantError, match=f"key '{key}'"):
        verify_file(rep.path, bad_kv, plans, rep.crc32)

    info = GGUFFile(rep.path).tensors["blk.0.ffn_down.weight"]
    data = bytearray(rep.path.read_bytes())
    data[info.offset + 5] ^= 1
    corrupt = tmp_path / "b.gguf"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(GemmaQuantError, match="tensor 'blk.0.ffn_down.weight' bytes"):
        verify_file(corrupt, kv, plans, rep.crc32)


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_header_error_is_reported_and_nothing_is_left(tiny, tmp_path, workers, background):
    """A header (vocabulary) error, built inline or in the header process, with one worker or
    several, reaches the caller as the one-line error, with nothing left at the output path."""
    import shutil

    from gemmaquant.export.gguf.header import HeaderJob, start_header

    d, _ = tiny["gemma3"]
    broken = tmp_path / "m"
    shutil.copytree(d, broken)
    (broken / "tokenizer.model").write_bytes(b"\x0a\x05oops")  # truncated protobuf
    ck = Checkpoint(broken)
    plan = start_header(ck, "q8_0")  # inline for a tiny vocabulary; the process is asked for below
    job = HeaderJob(ck.path, ck.config, plan.scheme, plan.plans, None, background=background)
    assert (job._proc is not None) == background
    with pytest.raises(GemmaQuantError, match="tokenizer.model") as e:
        write_gguf(ck, "q8_0", tmp_path / "out" / "x.gguf", workers=workers, header=job)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert job._proc is None  # the process was waited for


@pytest.mark.parametrize("kind,preset", [("gemma3", "q6_k"), ("gemma1", "bf16"), ("gemma2", "q4_k_m")])
def test_header_built_in_its_process_gives_the_same_file(tiny, tmp_path, kind, preset):
    """The header process (used for real vocabularies, which the tiny models lack) writes the same
    bytes as llama.cpp's pipeline, whether slabs wait for it or it waits for them."""
    pytest.importorskip("llama_cpp")
    from gemmaquant.export.gguf import writer
    from gemmaquant.export.gguf.header import HeaderJob, start_header

    d, ref_bf16 = tiny[kind]
    want = ref.quantize(ref_bf16, tmp_path / "ref.gguf", get_scheme(preset).ftype).read_bytes()
    ck = Checkpoint(d)
    plan = start_header(ck, preset)
    for wait_bytes in (writer.HEADER_WAIT_BYTES, 0):
        job = HeaderJob(ck.path, ck.config, plan.scheme, plan.plans, None, background=True)
        assert job._proc is not None
        writer.HEADER_WAIT_BYTES, saved = wait_bytes, writer.HEADER_WAIT_BYTES
        try:
            got = write_gguf(ck, preset, tmp_path / f"ours{wait_bytes}.gguf", header=job, workers=2).path
        finally:
            writer.HEADER_WAIT_BYTES = saved
        assert got.read_bytes() == want


def test_a_stopped_header_process_is_an_error_not_a_hang(tiny, tmp_path):
    import signal

    from gemmaquant.export.gguf.header import HeaderJob, start_header

    ck = Checkpoint(tiny["gemma3"][0])
    plan = start_header(ck, "q8_0")
    job = HeaderJob(ck.path, ck.config, plan.scheme, plan.plans, None, background=True)
    job._proc.send_signal(signal.SIGKILL)
    with pytest.raises(GemmaQuantError, match="building the GGUF header failed \\(child exit code -9\\)"):
        write_gguf(ck, "q8_0", tmp_path / "x.gguf", header=job)
    assert not list(tmp_path.iterdir())


def test_header_job_for_another_output_is_refused(tiny, tmp_path):
    from gemmaquant.export.gguf.header import start_header

    ck = Checkpoint(tiny["gemma3"][0])
    with pytest.raises(GemmaQuantError, match="header job was started for another"):
        write_gguf(ck, "q8_0", tmp_path / "x.gguf", header=start_header(ck, "q6_k"))
    assert not list(tmp_path.iterdir())


def test_gguf_header_and_plans_need_no_torch():
    """`quantize` to GGUF starts the header process before torch's ~1.5 s import: the modules it
    needs up to then must not import torch."""
    import subprocess
    import sys

    code = ("import sys, gemmaquant.cli.app, gemmaquant.pipeline, gemmaquant.formats.checkpoint, gemmaquant.export.gguf.header, "
            "gemmaquant.cli.plan_view, gemmaquant.export.diskspace, gemmaquant.export.atomic, gemmaquant.export.gguf.plan; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
