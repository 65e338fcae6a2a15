"""Whole files of every llama-quantize preset against llama-quantize's, and llama.cpp running them.

Default (slow tier): a tiny random Gemma 3 with 256-wide rows -- the smallest layout on which every
preset's own types are written (256-weight blocks for the K/IQ/TQ types, so no fallback; 2 layers for
the per-layer mixes) -- each preset byte for byte against llama-quantize, without an imatrix where
llama-quantize allows it and with the same imatrix given to both. That identity is the essential check
and runs for every preset.

llama.cpp's perplexity on our file against our `eval` of it checks that the file runs, not how it was
made, so it runs by default only for one preset per type family (PPL_PRESETS: a legacy, a K-quant, an
IQ4, an IQ3, an IQ2, an IQ1 and a ternary type), enough to catch a dequantizer or loader mismatch in any
family. For all 22 presets it more than doubles this file's time on a 2-core machine (RESULTS.md),
too much for the default suite; GEMMAQUANT_ALL_PRESETS_PPL=1 runs it for all of them.
GEMMAQUANT_DEMO_GGUF=1 adds the demo model (Gemma 3 270M): every preset byte for byte against
llama-quantize, an imatrix file (computed by our forward pass) for the ones that need one (minutes).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.export.gguf.writer import write_gguf
from gemmaquant.schemes import GGUF_NEEDS_IMATRIX, SCHEMES, get_scheme

from . import llamacpp_ref as ref

OLD = {"bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q4_0"}  # test_writer.py
NEW = [s.name for s in SCHEMES.values() if s.is_gguf and s.name not in OLD]
NEEDS = GGUF_NEEDS_IMATRIX | {"iq3_xxs", "iq3_xs"}  # on 256-wide rows these two need one as well
DEMO = os.environ.get("GEMMAQUANT_DEMO_GGUF") == "1"
# one preset per type family for llama.cpp's perplexity by default (docstring); all of them on request
PPL_PRESETS = {"q5_1", "q3_k_m", "iq4_xs", "iq3_s", "iq2_xs", "iq1_s", "tq1_0"}
ALL_PPL = os.environ.get("GEMMAQUANT_ALL_PRESETS_PPL") == "1"
assert PPL_PRESETS <= set(NEW), PPL_PRESETS - set(NEW)  # a renamed preset must not silently drop a family
pytestmark = [pytest.mark.llamacpp, pytest.mark.subprocess]


def _imatrix(tmp_path, config):
    """A deterministic imatrix file for every 2-D tensor but token_embd, as llama-imatrix writes."""
    import torch

    from gemmaquant.formats.gguf.imatrix import read_imatrix, write_imatrix
    from gemmaquant.export.gguf.plan import plan_types

    g = torch.Generator().manual_seed(3)
    sums = {p.name: torch.rand(p.n_per_row, generator=g) * 50 + 0.01
            for p in plan_types(config, "q8_0", False) if len(p.shape) == 2 and p.name != "token_embd.weight"}
    path = tmp_path / "im.gguf"
    write_imatrix(path, sums, {k: 10 for k in sums}, datasets=["calib.txt"], chunk_count=3, chunk_size=512)
    return read_imatrix(path)


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny256")
    d = ref.tiny_checkpoint("gemma3-256", root / "tiny-gemma3-256-1M")
    return d, ref.convert(d, "bf16"), _imatrix(root, Checkpoint(d).config)


def _same_file(ck, bf16, preset, tmp_path, im=None):
    want = ref.quantize(bf16, tmp_path / "ref.gguf", get_scheme(preset).ftype,
                        imatrix=None if im is None else {k: v.numpy() for k, v in im.importance.items()},
                        meta=None if im is None else im.meta())
    got = write_gguf(ck, preset, tmp_path / f"ours.{preset}.gguf",
                     imatrix=None if im is None else im.importance, imatrix_meta=None if im is None else im.meta())
    assert got.path.stat().st_size == want.stat().st_size
    assert got.path.read_bytes() == want.read_bytes()
    return got


@pytest.mark.parametrize("preset", NEW)
def test_tiny_file_identical_to_llama_quantize(tiny256, tmp_path, preset):
    d, bf16, im = tiny256
    ck = Checkpoint(d)
    got = _same_file(ck, bf16, preset, tmp_path, im)  # with the same imatrix
    if preset not in NEEDS:  # and without one (the *_ref quantizers, other ffn_down types for some)
        (tmp_path / "plain").mkdir()
        _same_file(ck, bf16, preset, tmp_path / "plain")
    # the preset's own types were written, not only fallbacks
    assert get_scheme(preset).default_type in got.type_counts
    if preset in PPL_PRESETS or ALL_PPL:
        _ppl_as_llama_cpp(got.path)


def _ppl_as_llama_cpp(path):
    """llama.cpp loads `path`, and its perplexity (llama-perplexity's method: 2 chunks of 64, the second
    half scored) equals our `eval` of the same file within the 1 % that llama.cpp's rounding of
    activations costs."""
    import torch

    from gemmaquant.evaluate.artifact import open_artifact
    from gemmaquant.evaluate.perplexity import chunk_nll, chunk_tokens, perplexity
    from tests.llamacpp import open_llama

    llm = open_llama(path, n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False)
    rng = np.random.default_rng(0)
    chunks = chunk_tokens([2] + rng.integers(4, ref.TINY_VOCAB, 160).tolist(), 64, 2, 2)
    first = 32
    nll = []
    for c in chunks:
        llm.reset()
        llm.eval(c.tolist())
        logits = torch.from_numpy(np.array(llm.scores[: len(c)], dtype=np.float32))
        nll.append(chunk_nll(logits[first:-1], c[first + 1:]))
    theirs = float(np.exp(torch.cat(nll).mean().item()))
    art = open_artifact(str(path), torch.float32)
    ours = perplexity(lambda x, f: art.model(x, logits_from=f), chunks).ppl
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)


# -- the demo model, opt-in --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not DEMO:
        pytest.skip("set GEMMAQUANT_DEMO_GGUF=1 to compare every preset on Gemma 3 270M (tens of minutes)")
    from gemmaquant.formats.demo import ensure_demo_checkpoint
    from gemmaquant.formats.gguf.imatrix import read_imatrix
    from gemmaquant.calib.imatrix import compute_imatrix

    d = ensure_demo_checkpoint()
    path = tmp_path_factory.mktemp("demo-im") / "demo.imatrix.gguf"  # through a file, as users give it
    compute_imatrix(Checkpoint(d), n_samples=8, seq_len=256).save(path)
    return d, ref.convert(d, "bf16"), read_imatrix(path)


@pytest.mark.parametrize("preset", NEW)
def test_demo_file_identical_to_llama_quantize(demo, tmp_path, preset):
    from gemmaquant.schemes import DEMO_BPW

    d, bf16, im = demo
    rep = _same_file(Checkpoint(d), bf16, preset, tmp_path, im if preset in GGUF_NEEDS_IMATRIX else None)
    assert abs(8 * rep.file_bytes / sum(p.numel for p in rep.plans) - DEMO_BPW[preset]) < 6e-4  # `schemes`' figure
