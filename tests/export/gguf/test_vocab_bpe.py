"""Gemma 3 saved by transformers 5 (tokenizer.json + tokenizer_config.json, no tokenizer.model): our GGUF
equals convert_hf_to_gguf.py's gpt2-route file, and tokenizes as transformers and llama.cpp do."""

from __future__ import annotations

import pytest

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.errors import GemmaQuantError

from . import llamacpp_ref as ref

pytestmark = [pytest.mark.llamacpp, pytest.mark.subprocess]
VOCAB = 262208  # gemma-3-4b/12b/27b's padded vocabulary: ids past the tokenizer's are [PAD{i}]


@pytest.fixture(scope="module")
def tokjson(demo_dir, tmp_path_factory):
    """A tiny Gemma3ForCausalLM with the real Gemma 3 tokenizer, both as transformers 5.23 saves them."""
    transformers = pytest.importorskip("transformers")
    import torch

    out = tmp_path_factory.mktemp("tj") / "tiny-gemma-3-tokjson"
    cfg = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                                        query_pre_attn_scalar=32)
    torch.manual_seed(0)
    transformers.Gemma3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(demo_dir).save_pretrained(out)
    assert not (out / "tokenizer.model").exists() and (out / "tokenizer.json").exists()
    return out, ref.convert(out, "bf16")


def test_gguf_equals_the_converters_gpt2_route(tokjson, tmp_path):
    """Byte for byte: ours (q8_0) = llama-quantize(convert_hf_to_gguf.py bf16, q8_0)."""
    from gemmaquant.export.gguf.writer import write_gguf
    from gemmaquant.schemes import get_scheme

    d, want = tokjson
    want_q8 = ref.quantize(want, tmp_path / "ref.gguf", get_scheme("q8_0").ftype).read_bytes()
    assert write_gguf(Checkpoint(d), "q8_0", tmp_path / "q8.gguf").path.read_bytes() == want_q8


def test_tokenizes_like_transformers_and_llama_cpp(tokjson, tmp_path):
    import transformers

    from gemmaquant.evaluate.artifact import open_artifact
    from gemmaquant.export.gguf.writer import write_gguf
    from gemmaquant.formats.texts import eval_text
    from tests.llamacpp import open_llama

    d, _ = tokjson
    path = write_gguf(Checkpoint(d), "q8_0", tmp_path / "ours.gguf").path
    text = eval_text(None).path.read_text(encoding="utf-8")[:20000] + "\n\n\t  tabs\u00a0and 🦙 <start_of_turn>user"
    hf = transformers.AutoTokenizer.from_pretrained(d).encode(text)
    ours = open_artifact(str(path)).tokenizer.encode(text)
    llm = open_llama(path, vocab_only=True, verbose=False)
    lcpp = llm.tokenize(text.encode(), add_bos=True, special=True)
    assert ours == hf
    assert lcpp == hf


def test_a_foreign_tokenizer_json_is_refused(tokjson, tmp_path):
    """Not Gemma 3's pre-tokenizer: the converter refuses it, so do we (one line naming the file)."""
    import json
    import shutil

    from gemmaquant.export.gguf.writer import write_gguf

    d, _ = tokjson
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    tj = json.loads((bad / "tokenizer.json").read_text(encoding="utf-8"))
    tj["normalizer"] = {"type": "Lowercase"}
    (bad / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(GemmaQuantError, match="tokenizer.json: its pre-tokenizer"):
        write_gguf(Checkpoint(bad), "bf16", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
