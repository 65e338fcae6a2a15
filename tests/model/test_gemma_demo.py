"""The built-in forward pass on the real Gemma 3 270M against transformers (float32), and `eval` end to end."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.model.loading import load_model
from gemmaquant.formats.texts import builtin_eval_path
from gemmaquant.formats.tokenizer import load_tokenizer

TEXT = builtin_eval_path()  # the shipped evaluation text
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ids(demo_dir):
    tok = load_tokenizer(demo_dir)
    # 600 tokens: longer than the 512-token sliding window, so local and global layers differ
    return torch.tensor([tok.encode(TEXT.read_text(), add_bos=True)[:600]])


def test_demo_logits_match_transformers_float32(demo_dir, ids):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = ref(ids).logits[0]
    del ref
    with torch.inference_mode():
        ours = load_model(Checkpoint(demo_dir), torch.float32)(ids)[0]
    rel = ((ours - expected).norm() / expected.norm()).item()
    top1 = (ours.argmax(-1) == expected.argmax(-1)).float().mean().item()
    max_abs = (ours - expected).abs().max().item()
    print(f"\ndemo vs transformers (float32, {ids.shape[1]} tokens): rel {rel:.2e}, top-1 {top1:.4f}, "
          f"max |dlogit| {max_abs:.2e}")
    assert rel <= 1e-5
    assert top1 >= 0.999
    assert max_abs < 1e-2


def test_eval_cli_on_the_demo(demo_dir, tmp_path):
    out = tmp_path / "ppl.json"
    # no --text: the shipped evaluation text, named with its sha256 in the output
    r = subprocess.run([sys.executable, "-m", "gemmaquant.cli", "eval", str(demo_dir),
                        "--ctx", "256", "--chunks", "2", "--json", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["text"] == "built-in:default_eval.txt"
    assert res["text_sha256"] == hashlib.sha256(TEXT.read_bytes()).hexdigest()
    assert res["tokens_scored"] == 2 * (256 - 1 - 128)
    assert 3 < res["ppl"] < 60 and res["ppl_stderr"] > 0  # a 270M base model on English licence text


def test_eval_compile_gives_the_same_perplexity(demo_gguf, tmp_path):
    # llama.cpp's Q4_K_M file holds Q4_K, Q5_0, Q6_K and Q8_0 tensors: each compiled dequantizer must
    # reproduce the plain one's bits, so the perplexity is the same float, not merely close.
    res = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / f"ppl{len(flag)}.json"
        r = subprocess.run([sys.executable, "-m", "gemmaquant.cli", "eval", str(demo_gguf), "--text", str(TEXT),
                            "--ctx", "256", "--chunks", "1", "--json", str(out), "--quiet", *flag],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert "dequantizer turned off" not in r.stderr
        got = json.loads(out.read_text())
        if flag:  # the compiled path really ran, for every quantized type of the file
            assert set(got["compiled_dequant"]) >= {"Q4_K", "Q6_K", "Q8_0"}, got["compiled_dequant"]
        res[bool(flag)] = got["ppl"]
    assert res[True] == res[False]
