"""Our Gemma 4 importance matrix against llama-imatrix's own, on the same chunks of the same text.

Each tiny layout (31B-like dense with k_eq_v, its twin without, E2B-like with per-layer inputs and
KV sharing, MoE, the multimodal wrapper) is converted to an F32 GGUF by convert_hf_to_gguf.py (F32, so
llama.cpp's matmuls do not round activations; its bf16 output is byte-identical to ours,
tests/export/gguf/test_gemma4.py) and run by llama-imatrix; ours runs the bf16 checkpoint in float32.
Same tokens: llama.cpp's tokenization (llama-cpp-python, vocab only) must equal ours, and
`llama_chunks` cuts them as llama-imatrix does.

Equal: the set of entries (no K/V for KV-shared layers, no V on k_eq_v full layers; inp_gate/proj; the
router's ffn_gate_inp; per-expert ffn_gate_up_exps/ffn_down_exps), every dense count, the per-expert
counts up to a router near-tie (≤ 1 % of routings; none on this text), the chunk metadata. Close: the
sums, within 5e-3 of each tensor's largest column (measured: ≤ 1.5e-3; ggml's GELU table and
accumulation order).

llama-imatrix is a binary of the pinned llama.cpp (a plain CMake build of the llama-cpp-python 0.3.36
sdist): the directory GEMMAQUANT_LLAMA_BIN, else PATH; the test skips without it.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmaquant.calib.data import load_tokenizer_for
from gemmaquant.calib.imatrix import compute_imatrix, llama_chunks
from gemmaquant.formats.checkpoint import Checkpoint

from tests.export.gguf import llamacpp_ref as ref
from tests.llamacpp import open_llama
from tests.tiny_gemma4 import make_tiny_gemma4

pytestmark = [pytest.mark.llamacpp, pytest.mark.subprocess]
LAYOUTS = ("dense", "dense-kv", "e2b", "moe", "e2b-mm")
CTX, CHUNKS = 32, 4


def llama_imatrix() -> str:
    d = os.environ.get("GEMMAQUANT_LLAMA_BIN")
    exe = str(Path(d) / "llama-imatrix") if d else shutil.which("llama-imatrix")
    if not exe or not Path(exe).is_file():
        pytest.skip("llama-imatrix not found (set GEMMAQUANT_LLAMA_BIN to a llama.cpp build's bin directory)")
    return exe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    exe = llama_imatrix()
    root = tmp_path_factory.mktemp("g4imx")
    dirs = {k: root / k for k in LAYOUTS}
    for k, d in dirs.items():
        make_tiny_gemma4(k, d, dtype=torch.bfloat16)
    f32 = ref.convert_many([(d, "f32") for d in dirs.values()])
    rng = random.Random(1)  # words of the tiny tokenizer's letters: several merges, no unknown bytes
    text = root / "text.txt"
    text.write_text(" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 6)))
                             for _ in range(400)))
    return exe, text, {k: (d, f) for (k, d), f in zip(dirs.items(), f32)}


def _read(path: Path):
    import gguf

    r = gguf.GGUFReader(path)
    sums, counts = {}, {}
    for t in r.tensors:
        a = np.array(t.data, dtype=np.float64).reshape(-1)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = a
        else:
            counts[t.name[: -len(".counts")]] = a
    meta = {k: r.fields[k].contents() for k in ("imatrix.chunk_count", "imatrix.chunk_size")}
    return sums, counts, meta


@pytest.mark.parametrize("kind", LAYOUTS)
def test_imatrix_equals_llama_imatrix(tiny, tmp_path, kind):
    exe, text, models = tiny
    d, f32 = models[kind]
    theirs = tmp_path / "llama.imatrix.gguf"
    r = subprocess.run([exe, "-m", str(f32), "-f", str(text), "-o", str(theirs), "-c", str(CTX), "-b", str(CTX),
                        "-ub", str(CTX), "--chunks", str(CHUNKS), "-nr", "-t", "2", "--no-ppl"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    words = text.read_text()
    ids = load_tokenizer_for(d).encode(words, add_bos=True, parse_special=False)
    llm = open_llama(f32, vocab_only=True, verbose=False)
    assert list(ids) == llm.tokenize(words.encode(), add_bos=True, special=False)
    ours = tmp_path / "ours.imatrix.gguf"
    ck = Checkpoint(d)
    compute_imatrix(ck, ids=llama_chunks(list(ids), CTX, ck.config.bos_token_id, CHUNKS), dataset=str(text)).save(ours)

    s_o, c_o, m_o = _read(ours)
    s_r, c_r, m_r = _read(theirs)
    assert sorted(s_o) == sorted(s_r) and m_o == m_r == {"imatrix.chunk_count": CHUNKS, "imatrix.chunk_size": CTX}
    routed = moved = 0
    for name in s_r:
        if c_r[name].size == 1:
            assert c_o[name].tolist() == c_r[name].tolist(), name
            same = np.ones(1, dtype=bool)
        else:  # per expert: the routing. A near-tie in a router may flip between ggml and torch (measured:
            # none here, 2 of 8192 routings on 8 × 64 tokens, benchmarks/gemma4_calibration.py); such experts'
            # sums differ by that token, so they are left out of the value check
            same = c_o[name] == c_r[name]
            routed += int(c_r[name].sum())
            moved += int(np.abs(c_o[name] - c_r[name]).sum()) // 2
        a, b = s_o[name].reshape(same.size, -1)[same], s_r[name].reshape(same.size, -1)[same]
        err = np.abs(a - b).max() / np.abs(s_r[name]).max()
        assert err < 5e-3, (name, err)
    assert moved <= 0.01 * routed, (moved, routed)
    cfg = ck.config
    for i in range(cfg.num_hidden_layers):  # what llama-imatrix records, layout by layout
        assert (f"blk.{i}.attn_k.weight" in s_r) == (not cfg.kv_shared(i))
        assert (f"blk.{i}.attn_v.weight" in s_r) == cfg.has_v_proj(i)
        assert (f"blk.{i}.inp_gate.weight" in s_r) == (f"blk.{i}.proj.weight" in s_r) == bool(
            cfg.hidden_size_per_layer_input)
        assert (f"blk.{i}.ffn_gate_up_exps.weight" in s_r) == (f"blk.{i}.ffn_gate_inp.weight" in s_r) == cfg.is_moe
        if cfg.is_moe:
            assert len(c_r[f"blk.{i}.ffn_gate_up_exps.weight"]) == cfg.num_experts
