"""The GGUF tokenizer keys of a SentencePiece Gemma, as `convert_hf_to_gguf.py` writes them.

Arrays follow `TextModel._create_vocab_sentencepiece` (docs/gguf-gemma.md §1.4):

1. V = config `vocab_size`; every id starts as `[PAD{i}]`, score -10000, UNUSED.
2. Each SentencePiece id < V: its piece as UTF-8 (keeps `▁`), its score, and a type where
   unknown/control/unused/byte keep theirs and everything else -- USER_DEFINED included -- is NORMAL.
3. `added_tokens.json` entries: score -1000, USER_DEFINED.
4. `tokenizer_config.json` `added_tokens_decoder` entries: score -1000, CONTROL if `special` or the text
   looks special (`<pad>`, `<mask>`, `<2mass>`, `[@BOS@]`, `<|…|>`, `<｜…｜>`, `<unused…>`), else
   USER_DEFINED with `▁` turned into a space (llama.cpp matches user-defined tokens on raw text).

Special ids, add_bos/add_eos and the chat template come from the `gguf` package's `SpecialVocab`,
the very code the converter runs. Gemma 1 additionally gets `eot_token_id` 107 (its prefix/suffix/
middle/fsep ids 67/69/68/70 have no GGUFWriter method and are dropped, as in the converter), and every
generation writes `add_space_prefix = false` (without it llama.cpp prepends a space for SPM vocabs).

Gemma 4 ships a byte-fallback BPE `tokenizer.json` only; the converter reads it through transformers
(`gguf.LlamaHfVocab`), which we reproduce from the files: the model vocabulary by id, then added tokens
beyond it; every score -1000; BYTE for `<0xXX>`, CONTROL for transformers' special tokens (the
standard ones, every `*_token` key of tokenizer_config.json, its extra special tokens), else NORMAL
(added tokens: USER_DEFINED); seven chat-syntax tokens forced USER_DEFINED so llama.cpp renders them.
Merges and special ids again come from `SpecialVocab`; `add_bos_token` is forced true.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from ...errors import GemmaQuantError
from ...formats.inputs import MAX_JSON_BYTES, read_bytes
from ...formats.tokenizer import check_vocab_rows
from ...formats.spm_proto import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, decode_model_proto
from .vocab_bpe import looks_special  # the converter's rule, shared by both vocabulary routes

_SPACE_MARK = "\u2581"  # ▁


@dataclass
class VocabArrays:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]


def _read_json(path: Path) -> dict:
    from ...formats.inputs import read_json

    return read_json(path, path.name)


def sentencepiece_arrays(model_dir: Path, vocab_size: int | None) -> VocabArrays:
    model_dir = Path(model_dir)
    sp_path = model_dir / "tokenizer.model"
    if not sp_path.is_file():
        raise GemmaQuantError(f"{model_dir}: no tokenizer.model (GGUF export needs the SentencePiece model)")
    sp = decode_model_proto(read_bytes(sp_path, "tokenizer.model", MAX_JSON_BYTES), str(sp_path))
    v = vocab_size or len(sp.pieces)
    check_vocab_rows(len(sp.pieces), v, sp_path)
    tokens = [f"[PAD{i}]".encode() for i in range(v)]
    scores = [-10000.0] * v
    types = [UNUSED] * v
    for i, (piece, score, ptype) in enumerate(sp.pieces[:v]):
        tokens[i] = piece.encode("utf-8")
        scores[i] = score
        types[i] = ptype if ptype in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL

    added = model_dir / "added_tokens.json"
    if added.exists():
        for text, tid in _read_json(added).items():
            if isinstance(tid, int) and 0 <= tid < v:
                tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), -1000.0, USER_DEFINED

    tc = model_dir / "tokenizer_config.json"
    if tc.exists():
        decoder = _read_json(tc).get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise GemmaQuantError(f"{tc}: 'added_tokens_decoder' must be an object of id -> token")
        for key, data in decoder.items():
            try:
                tid, text = int(key), data["content"]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, TypeError, KeyError):
                raise GemmaQuantError(f"{tc}: 'added_tokens_decoder' entry {key!r} must map a token id to "
                                      '{"content": "<text>", ...}') from None
            if not 0 <= tid < v:
                continue
            if data.get("special") or looks_special(text):
                types[tid] = CONTROL
            else:
                text = text.replace(_SPACE_MARK, " ")
                types[tid] = USER_DEFINED
            scores[tid], tokens[tid] = -1000.0, text.encode("utf-8")
    return VocabArrays(tokens, scores, types)


_STANDARD_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
            '<|"|>'}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def special_token_texts(tokenizer_config: dict) -> set[str]:
    """transformers 5's `all_special_tokens` as its tokenizer __init__ collects them."""
    texts = {_token_text(v) for k, v in tokenizer_config.items()
             if k in _STANDARD_SPECIALS or (k.endswith("_token") and _token_text(v) is not None)}
    extra = tokenizer_config.get("extra_special_tokens", tokenizer_config.get("additional_special_tokens"))
    if isinstance(extra, dict):
        extra = list(extra.values())
    texts |= {_token_text(v) for v in extra or []}
    return texts - {None}


def bpe_arrays(model_dir: Path) -> VocabArrays:
    """The token arrays of a Gemma 4 tokenizer.json, as `gguf.LlamaHfVocab` + Gemma4Model.set_vocab."""
    from ...formats.inputs import read_json

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise GemmaQuantError(f"{model_dir}: no tokenizer.json (a Gemma 4 GGUF needs its BPE tokenizer)")
    tj = read_json(path, "tokenizer.json")
    model = tj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not model.get("byte_fallback") \
            or (tj.get("decoder") or {}).get("type") != "Sequence" or not isinstance(model.get("vocab"), dict):
        raise GemmaQuantError(f"{path}: not a byte-fallback BPE tokenizer (model type BPE, byte_fallback, a "
                              "Sequence decoder), which is what Gemma 4 ships")
    vocab: dict[str, int] = model["vocab"]
    base = len(vocab)
    text_of = {i: t for t, i in vocab.items()}
    added = sorted(((a["id"], a["content"]) for a in tj.get("added_tokens") or []), key=lambda x: x[0])
    for i, t in added:
        text_of[i] = t
    id_of = {t: i for i, t in text_of.items()}
    tc = Path(model_dir) / "tokenizer_config.json"
    specials = special_token_texts(_read_json(tc)) if tc.is_file() else set()
    special_ids = {id_of[t] for t in specials if t in id_of}
    tokens, types = [], []
    for i in range(base):
        if i not in text_of:
            raise GemmaQuantError(f"{path}: the vocabulary has no token with id {i} (ids must be 0..{base - 1})")
        t = text_of[i]
        tokens.append(t)
        types.append(BYTE if _BYTE_PIECE.fullmatch(t) else CONTROL if i in special_ids else NORMAL)
    for i, t in added:
        if i >= base:
            tokens.append(t)
            types.append(CONTROL if t in specials else USER_DEFINED)
    types = [USER_DEFINED if t in _VISIBLE else ty for t, ty in zip(tokens, types)]
    return VocabArrays([t.encode("utf-8") for t in tokens], [-1000.0] * len(tokens), types)


def embedding_rows_kept(model_dir: Path, vocab_size: int) -> int:
    """token_embd rows the Gemma 3/4 converter keeps for a tokenizer.json-only model: it cuts the
    table to len(model.vocab) + len(added_tokens)."""
    from ...formats.inputs import read_json

    tj = read_json(Path(model_dir) / "tokenizer.json", "tokenizer.json")
    return min(vocab_size, len(tj["model"]["vocab"]) + len(tj.get("added_tokens") or []))


def _special_vocab(writer: gguf.GGUFWriter, model_dir: Path, **kw) -> None:
    # gguf's SpecialVocab logs a warning for Gemma's <bos>-separated pair template (the converter
    # prints it too); it changes nothing in the file, so keep it off our users' terminals
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        gguf.SpecialVocab(model_dir, **kw).add_to_gguf(writer, quiet=True)
    finally:
        log.setLevel(level)


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, generation: int, vocab_size: int | None) -> VocabArrays:
    """Add the tokenizer.* keys in the converter's order (its `set_vocab`); returns the arrays."""
    model_dir = Path(model_dir)
    if generation == 4:
        arrays = bpe_arrays(model_dir)
        writer.add_tokenizer_model("gemma4")
        writer.add_token_list(arrays.tokens)
        writer.add_token_scores(arrays.scores)
        writer.add_token_types(arrays.types)
        _special_vocab(writer, model_dir, load_merges=True)
        writer.add_add_space_prefix(False)
        quiet = logging.getLogger("gguf.gguf_writer")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the converter forces it over SpecialVocab's value ("Duplicated key")
        try:
            writer.add_add_bos_token(True)
        finally:
            quiet.setLevel(level)
        return arrays
    if generation == 3 and vocab_size and not (model_dir / "tokenizer.model").is_file() \
            and (model_dir / "tokenizer.json").is_file():
        from .vocab_bpe import bpe_vocab  # the converter's Gemma 3 without tokenizer.model: gpt2 route

        tokens, types, pre = bpe_vocab(model_dir, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        _special_vocab(writer, model_dir, n_vocab=len(tokens), load_merges=True)
        return VocabArrays([t.encode("utf-8") for t in tokens], [], types)
    if not (model_dir / "tokenizer.model").is_file() and (model_dir / "tokenizer.json").is_file():
        raise GemmaQuantError(f"{model_dir}: no tokenizer.model; llama.cpp's converter reads a Gemma "
                              f"{generation} vocabulary only from it (Gemma 3 also from tokenizer.json alone)")
    arrays = sentencepiece_arrays(model_dir, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(arrays.tokens)
    writer.add_token_scores(arrays.scores)
    writer.add_token_types(arrays.types)
    _special_vocab(writer, model_dir, n_vocab=len(arrays.tokens))
    if generation == 1:  # CodeGemma FIM ids; only eot has a writer method
        sv = gguf.SpecialVocab(model_dir, load_merges=False,
                               special_token_types=["prefix", "suffix", "middle", "fsep", "eot"])
        for typ, tid in (("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70), ("eot", 107)):
            sv._set_special_token(typ, tid)
        sv.chat_template = None  # already added above
        sv.special_token_ids = {t: i for t, i in sv.special_token_ids.items()
                                if hasattr(writer, f"add_{t}_token_id")}
        sv.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(False)
    return arrays
