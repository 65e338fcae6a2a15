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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf

from ...errors import GemmaQuantError
from ...formats.inputs import MAX_JSON_BYTES, read_bytes
from ...formats.tokenizer import check_vocab_rows
from ...formats.spm_proto import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, decode_model_proto

_SPACE_MARK = "\u2581"  # ▁


@dataclass
class VocabArrays:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]


def looks_special(text: str) -> bool:
    """`TextModel.does_token_look_special`: added tokens that must be CONTROL even if not `special`."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


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


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, generation: int, vocab_size: int | None) -> VocabArrays:
    """Add the tokenizer.* keys in the converter's order (its `set_vocab`); returns the arrays."""
    arrays = sentencepiece_arrays(model_dir, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(arrays.tokens)
    writer.add_token_scores(arrays.scores)
    writer.add_token_types(arrays.types)
    # gguf's SpecialVocab logs a warning for Gemma's <bos>-separated pair template (the converter
    # prints it too); it changes nothing in the file, so keep it off our users' terminals
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        gguf.SpecialVocab(model_dir, n_vocab=len(arrays.tokens)).add_to_gguf(writer, quiet=True)
    finally:
        log.setLevel(level)
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
