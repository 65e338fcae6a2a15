"""Our tokenizer against llama.cpp's on the same vocabulary (the demo GGUF), token for token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemmaquant.errors import GemmaQuantError
from gemmaquant.formats.texts import builtin_eval_path
from gemmaquant.formats.tokenizer import load_tokenizer
from tests.llamacpp import open_llama

DEV_EVAL = builtin_eval_path()  # the shipped evaluation text (90 kB of licence documents)

TRICKY = [
    *(" " * n for n in range(1, 41)),  # user-defined pieces cover runs of 2..31 spaces
    *("\t" * n for n in (1, 2, 5, 31, 33)), *("\n" * n for n in (1, 2, 3, 31, 40)),
    "a\n\n\nb", "\t\tx = 1\n", "    def f():\n        return 1\n", "a  b   c    d", "  \n  \n", "\r\n",
    " leading", "  leading", "trailing  ", "[multimodal]", "x [multimodal] y", "<table><tr><td>1</td>",
    "<start_of_turn>user\nhi<end_of_turn>", "<bos>hello<eos>", "<unused5>", "<unk>", "<mask>",
    "<start_of_image>", "<start_of_turn", "a</s>b", "</s>", "<|endoftext|>", "🤽 emoji 😀👍🏽", "日本語のテキスト 中文 한국어", "e\u0301 é",
    "\x00\x01\x7f", "\u200b\ufeff", "\U0010ffff", "𝔹𝔹𝔹", "x" * 200, "3.14159 and 2024", "",
]


@pytest.fixture(scope="module")
def llama_vocab(demo_gguf):
    return open_llama(demo_gguf, vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def tok(demo_dir):
    return load_tokenizer(demo_dir)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_dev_eval_equals_llama_cpp(tok, llama_vocab):
    text = DEV_EVAL.read_text(encoding="utf-8")
    ref = llama_vocab.tokenize(text.encode(), add_bos=True, special=False)
    assert len(ref) > 15_000
    ours = tok.encode(text, parse_special=False)
    assert ours == ref
    assert tok.encode(text) == llama_vocab.tokenize(text.encode(), add_bos=True, special=True)
    assert llama_vocab.detokenize(ref[1:]).decode() == text
    assert tok.decode(ref[1:]) == text


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize("parse_special", [False, True])
@pytest.mark.parametrize("text", TRICKY, ids=[repr(t)[:24] for t in TRICKY])
def test_tricky_strings_equal_llama_cpp(tok, llama_vocab, text, parse_special):
    # parse_special=True turns control-token text into its id (llama.cpp special=True, transformers'
    # default); False keeps it text (llama.cpp's default). User-defined pieces match in both.
    ref = llama_vocab.tokenize(text.encode(), add_bos=True, special=parse_special)
    assert tok.encode(text, parse_special=parse_special) == ref
    assert tok.encode(text, add_bos=False, parse_special=parse_special) == ref[1:]


def test_demo_tokenizer_fields(tok):
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size, tok.add_bos) == (2, [1, 106], 262144, True)
    assert tok.encode("Hi")[0] == 2 and tok.encode("Hi", add_bos=False)[0] != 2
    assert tok.decode([2, 9259, 1902], skip_special=True) == "Hello world"


def test_transformers_reads_the_same_tokenizer(demo_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(demo_dir)
    for text in ["Hello world", "  two spaces\n\n\tand a tab", "<start_of_turn>user\nhi<end_of_turn>"]:
        assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.bos_token_id == 2 and hf.eos_token_id == 1 and hf.pad_token_id == 0


def _link_files(src: Path, dst: Path, names):
    dst.mkdir()
    for n in names:
        (dst / n).symlink_to(src / n)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_tokenizer_model_fallback_equals_llama_cpp(demo_dir, llama_vocab, tmp_path):
    d = tmp_path / "spm_only"
    _link_files(demo_dir, d, ["tokenizer.model"])
    tok = load_tokenizer(d)  # no tokenizer_config: BOS/EOS from the SentencePiece trainer spec
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (2, [1], True)
    text = DEV_EVAL.read_text(encoding="utf-8")[:20_000] + "".join(TRICKY)
    assert tok.encode(text, parse_special=False) == llama_vocab.tokenize(text.encode(), add_bos=True, special=False)


def test_add_bos_follows_tokenizer_config(demo_dir, tmp_path):
    d = tmp_path / "nobos"
    _link_files(demo_dir, d, ["tokenizer.json"])
    cfg = json.loads((demo_dir / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    tok = load_tokenizer(d)
    assert tok.encode("Hello") == [9259]
    assert tok.encode("Hello", add_bos=True) == [2, 9259]


def test_missing_or_bad_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(GemmaQuantError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(GemmaQuantError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05ab")
    with pytest.raises(GemmaQuantError, match="tokenizer.model: not a SentencePiece model"):
        load_tokenizer(tmp_path)


def test_sentencepiece_reads_our_tokenizer_model(demo_dir, llama_vocab):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(demo_dir / "tokenizer.model"))
    assert sp.get_piece_size() == 262144
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (2, 1, 0, 3)
    for i in (0, 5, 106, 138, 238, 494, 9259, 255968, 262143):
        assert sp.id_to_piece(i).replace("▁", " ").encode() == llama_vocab.detokenize([i], special=True) \
            or sp.is_byte(i)  # byte pieces detokenize to their byte
    # Plain prose (no whitespace runs, which only llama.cpp matches whole) tokenizes alike.
    text = "The quick brown fox, 3.14 times: naïve café 日本"
    assert [2, *sp.encode(text)] == llama_vocab.tokenize(text.encode(), add_bos=True, special=False)

