"""Hugging Face tokenizer files from a SentencePiece-BPE vocabulary (pieces, scores, types), and
(`gpt2_tokenizer_json_text`) from the tokens and merges of a GGUF converted by llama.cpp's gpt2 route.

We build the JSON ourselves, the way transformers' `GemmaConverter` (convert_slow_tokenizer.py) does,
so that neither transformers nor sentencepiece is needed at run time:

- model: BPE over the whole vocabulary with byte_fallback; merges are every split `(l, r)` of a piece
  whose halves are both pieces, ordered by the merged piece's score (highest first). SentencePiece
  BPE merges the adjacent pair whose result scores highest, so ordering the merges by that score
  reproduces it (checked token for token against llama.cpp in tests/formats/test_tokenizer.py).
- normalizer: Replace " " → "▁" (Gemma's normalizer is the identity: no dummy prefix, spaces kept).
- pre-tokenizer: none. (GemmaConverter writes Split(" ", MergedWithPrevious), which never fires
  because the normalizer has already replaced every space.)
- added_tokens: every CONTROL and USER_DEFINED piece (and the UNKNOWN one), matched on the raw text
  before normalization (`normalized: false`). This is what makes runs of spaces, newlines and tabs,
  stored as user-defined pieces with literal characters (id 138 = two spaces), match whole as they
  do in llama.cpp; control pieces are `special`, user-defined ones are not.
- post-processor: TemplateProcessing that puts <bos> first when the tokenizer adds it.
- decoder: Replace "▁" → " ", ByteFallback (<0xE2><0x82><0xAC> → "€"), Fuse.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import GemmaQuantError
from .spm_proto import PIECE_TYPES, BYTE, CONTROL, UNKNOWN, USER_DEFINED

Piece = tuple[str, float, int]  # (piece, score, SentencePiece type)


def generate_merges(pieces: list[Piece]) -> list[tuple[str, str]]:
    """All BPE merges implied by a SentencePiece-BPE vocabulary, highest-priority first.

    Same order as transformers' `generate_merges(vocab, vocab_scores)`: by the merged piece's
    score descending, ties broken by longer left, then longer right part, then first seen (pieces
    in id order, and within one piece by the ids of its halves).
    """
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    lefts: list[str] = []
    rights: list[str] = []
    scores: list[float] = []
    for piece, score, _ in pieces:
        local = []
        for cut in range(1, len(piece)):
            left = piece[:cut]
            if left in vocab:
                right = piece[cut:]
                if right in vocab:
                    local.append((vocab[left], vocab[right], left, right))
        if len(local) > 1:
            local.sort()
        for _, _, left, right in local:
            lefts.append(left)
            rights.append(right)
            scores.append(score)
    if not lefts:
        return []
    # np.lexsort is stable (primary key last), like Python's sorted(..., reverse=True) on ties.
    order = np.lexsort((-np.fromiter(map(len, rights), np.int64, len(rights)),
                        -np.fromiter(map(len, lefts), np.int64, len(lefts)),
                        -np.asarray(scores, dtype=np.float64)))
    return [(lefts[i], rights[i]) for i in order.tolist()]


def _added_token(idx: int, content: str, special: bool) -> dict:
    return {"id": idx, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def added_tokens(pieces: list[Piece]) -> list[tuple[int, str, bool]]:
    """(id, content, special) for the pieces matched whole before the BPE model sees the text."""
    return [(i, p, t in (CONTROL, UNKNOWN)) for i, (p, _, t) in enumerate(pieces)
            if t in (CONTROL, UNKNOWN, USER_DEFINED)]


def _check(pieces: list[Piece], ids: dict[str, int]):
    if not pieces:
        raise GemmaQuantError("tokenizer vocabulary is empty")
    for name, idx in ids.items():
        if not 0 <= idx < len(pieces):
            raise GemmaQuantError(f"tokenizer {name} {idx} is outside the vocabulary of {len(pieces)} pieces")
    n_bytes = sum(1 for _, _, t in pieces if t == BYTE)
    if n_bytes != 256:
        raise GemmaQuantError(f"tokenizer has {n_bytes} byte pieces; byte fallback needs all 256 (<0x00>..<0xFF>)")
    bad = [t for _, _, t in pieces if t not in PIECE_TYPES]
    if bad:
        raise GemmaQuantError(f"tokenizer piece type {bad[0]} is not a SentencePiece type")


def build_tokenizer_json(pieces: list[Piece], *, unk_id: int, bos_id: int, add_bos: bool = True) -> dict:
    """The tokenizer.json object (tokenizers' serialization format, version 1.0)."""
    _check(pieces, {"unk_id": unk_id, "bos_id": bos_id})
    bos = pieces[bos_id][0]
    if add_bos:
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    else:
        post = None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, p, s) for i, p, s in added_tokens(pieces)],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": pieces[unk_id][0], "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": {p: i for i, (p, _, _) in enumerate(pieces)},
            "merges": [list(m) for m in generate_merges(pieces)],
        },
    }


def tokenizer_json_text(pieces: list[Piece], *, unk_id: int, bos_id: int, add_bos: bool = True) -> str:
    """tokenizer.json text, compact (16 MB for Gemma's 262k pieces and 515k merges)."""
    return json.dumps(build_tokenizer_json(pieces, unk_id=unk_id, bos_id=bos_id, add_bos=add_bos),
                      ensure_ascii=False)


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def build_tokenizer_config(pieces: list[Piece], *, bos_id: int, eos_id: int, unk_id: int, pad_id: int,
                           add_bos: bool = True, add_eos: bool = False) -> dict:
    """tokenizer_config.json as Gemma 3's: the same added_tokens_decoder as tokenizer.json."""
    _check(pieces, {"bos_id": bos_id, "eos_id": eos_id, "unk_id": unk_id, "pad_id": pad_id})
    return {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "added_tokens_decoder": {str(i): {**_token_entry(p), "special": s} for i, p, s in added_tokens(pieces)},
        "bos_token": pieces[bos_id][0],
        "clean_up_tokenization_spaces": False,
        "eos_token": pieces[eos_id][0],
        "extra_special_tokens": {},
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": pieces[pad_id][0],
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": pieces[unk_id][0],
        "use_default_system_prompt": False,
    }


def build_special_tokens_map(pieces: list[Piece], *, bos_id: int, eos_id: int, unk_id: int, pad_id: int) -> dict:
    return {"bos_token": _token_entry(pieces[bos_id][0]), "eos_token": _token_entry(pieces[eos_id][0]),
            "pad_token": _token_entry(pieces[pad_id][0]), "unk_token": _token_entry(pieces[unk_id][0])}


_GPT2_SPACE = "\u0120"  # Ġ: how merges spell a space inside a part


def gpt2_tokenizer_json_text(tokens: list[str], types: list[int], merges: list[str], unk_id: int | None) -> str:
    """tokenizer.json text equivalent to a gpt2-route Gemma 3 GGUF vocabulary (export/gguf/vocab_bpe.py writes
    them; this runs such a GGUF here):
    BPE with byte fallback over its tokens and merges, spaces as ▁, added tokens matched whole."""
    pairs = []
    for m in merges:
        left, _, right = m.partition(" ")
        pairs.append([left.replace(_GPT2_SPACE, " "), right.replace(_GPT2_SPACE, " ")])
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == CONTROL} for i, (t, ty) in enumerate(zip(tokens, types))
             if ty in (CONTROL, USER_DEFINED)]
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk_id] if unk_id is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": pairs},
    }, ensure_ascii=False)


def gemma4_tokenizer_json_text(tokens: list[str], types: list[int], merges: list[str], *, unk_id: int) -> str:
    """tokenizer.json for a Gemma 4 GGUF's vocabulary (tokenizer.ggml.model "gemma4"): the stored BPE
    merges ("a b") as they are, the same normalizer/decoder as above, control and user-defined tokens
    matched whole."""
    pieces = [(t, 0.0, ty) for t, ty in zip(tokens, types)]
    _check(pieces, {"unk_id": unk_id})
    d = build_tokenizer_json(pieces, unk_id=unk_id, bos_id=unk_id, add_bos=False)
    d["model"]["merges"] = [m.split(" ", 1) for m in merges]
    return json.dumps(d, ensure_ascii=False)

