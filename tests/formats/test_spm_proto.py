"""spm_proto against the reference: sentencepiece's own C++ protobuf reader and writer."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemmaquant.errors import GemmaQuantError
from gemmaquant.formats.spm_proto import (BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, decode_model_proto,
                                  encode_model_proto)

spm = pytest.importorskip("sentencepiece")

GEMMA_IDS = dict(unk_id=3, bos_id=2, eos_id=1, pad_id=0,
                 unk_piece="<unk>", bos_piece="<bos>", eos_piece="<eos>", pad_piece="<pad>")


def small_vocab() -> list[tuple[str, float, int]]:
    """A Gemma-shaped BPE vocabulary: control ids 0-2, <unk> 3, a user-defined run of spaces, the
    256 byte pieces, then merges whose scores fall with their rank."""
    pieces = [("<pad>", 0.0, CONTROL), ("<eos>", 0.0, CONTROL), ("<bos>", 0.0, CONTROL),
              ("<unk>", 0.0, UNKNOWN), ("<start_of_turn>", 0.0, CONTROL), ("<b>", 0.0, USER_DEFINED)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    merged = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or",
              "▁wor", "ld", "▁world", "é", "日本"]
    pieces += [(p, -float(i), NORMAL) for i, p in enumerate(merged)]
    return pieces


def test_round_trip_and_fields():
    pieces = small_vocab() + [("x" * 300, -1.5, NORMAL), ("🤽", -1e9, NORMAL)]  # a >127-byte piece
    data = encode_model_proto(pieces, **GEMMA_IDS)
    m = decode_model_proto(data)
    assert m.pieces == [(p, struct.unpack("<f", struct.pack("<f", s))[0], t) for p, s, t in pieces]
    assert (m.model_type, m.vocab_size, m.byte_fallback) == (2, len(pieces), True)
    assert (m.unk_id, m.bos_id, m.eos_id, m.pad_id) == (3, 2, 1, 0)
    assert (m.unk_piece, m.bos_piece, m.eos_piece, m.pad_piece) == ("<unk>", "<bos>", "<eos>", "<pad>")
    assert (m.normalizer_name, m.add_dummy_prefix, m.remove_extra_whitespaces, m.escape_whitespaces) == \
        ("identity", False, False, True)


def test_sentencepiece_loads_what_we_encode():
    pieces = small_vocab()
    sp = spm.SentencePieceProcessor(model_proto=encode_model_proto(pieces, **GEMMA_IDS))
    assert sp.get_piece_size() == len(pieces)
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (2, 1, 0, 3)
    for i, (piece, score, ptype) in enumerate(pieces):
        assert sp.id_to_piece(i) == piece
        assert sp.get_score(i) == score
        assert (sp.is_control(i), sp.is_unknown(i), sp.is_byte(i)) == \
            (ptype == CONTROL, ptype == UNKNOWN, ptype == BYTE)
    # BPE with the identity normalizer: no dummy prefix, merges by score, bytes for unknown chars.
    assert sp.encode("hello world", out_type=str) == ["he", "llo", "▁world"]
    assert sp.encode(" hello", out_type=str) == ["▁hello"]
    assert sp.encode("€", out_type=str) == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert sp.encode("<b>", out_type=str) == ["<b>"]  # user-defined pieces match whole


def test_negative_ids_round_trip():
    m = decode_model_proto(encode_model_proto(small_vocab(), unk_id=3, pad_id=-1, bos_id=-1))
    assert (m.pad_id, m.bos_id, m.unk_id) == (-1, -1, 3)


def trained_model(**extra) -> bytes:
    """A model written by sentencepiece's trainer (C++ protobuf): the reference encoder."""
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello there",
            "ünïcödé 日本語 text"] * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=out, model_type="bpe",
                                   vocab_size=330, byte_fallback=True, user_defined_symbols=["<b>"],
                                   minloglevel=2, **extra)
    return out.getvalue()


@pytest.mark.parametrize("extra", [{}, {"pad_id": 5, "unk_id": 0, "bos_id": -1, "eos_id": 1}])
def test_decodes_sentencepiece_trainer_output(extra):
    data = trained_model(**extra)
    sp = spm.SentencePieceProcessor(model_proto=data)
    m = decode_model_proto(data)
    assert len(m.pieces) == sp.get_piece_size() == m.vocab_size
    for i, (piece, score, ptype) in enumerate(m.pieces):
        assert piece == sp.id_to_piece(i)
        assert score == sp.get_score(i)
        assert (ptype == CONTROL, ptype == UNKNOWN, ptype == BYTE) == \
            (sp.is_control(i), sp.is_unknown(i), sp.is_byte(i))
    assert m.pieces[sp.piece_to_id("<b>")][2] == USER_DEFINED
    assert (m.model_type, m.byte_fallback) == (2, True)
    assert (m.unk_id, m.bos_id, m.eos_id, m.pad_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())
    # The trainer's default normalizer (nmt_nfkc, dummy prefix) is read back as such.
    assert (m.normalizer_name, m.add_dummy_prefix, m.remove_extra_whitespaces) == ("nmt_nfkc", True, True)


@pytest.mark.parametrize("data, problem", [
    (b"", "no pieces"),
    (b"\x0a\x05ab", "runs past the end"),
    (b"\x0a\x80", "truncated varint"),
    (b"\x0a" + b"\xff" * 11, "longer than 10 bytes"),
    (b"\x0b", "unsupported wire type 3"),
    (b"\x00", "field number 0"),
    (b"\x0a\x03\x0a\x01\xff", "not UTF-8"),
    (b"\x0a\x04\x15\x00\x00\x00", "truncated fixed-size"),
    (b"\x0a\x02\x18\x09", "type 9"),
    (b"\x0a\x02\x18\x01", "has no text"),
    (b"\x08\x01", "wire type 0, expected 2"),
    (b"\x0a\xff\xff\xff\xff\x0f", "runs past the end"),  # a 4 GiB length: refused, not allocated
])
def test_bad_bytes_name_the_problem(data, problem):
    with pytest.raises(GemmaQuantError, match=problem):
        decode_model_proto(data, what="x/tokenizer.model")


def test_truncations_and_bit_flips_never_crash():
    data = encode_model_proto(small_vocab()[:12], **GEMMA_IDS)
    for cut in range(len(data)):
        try:
            decode_model_proto(data[:cut])
        except GemmaQuantError:
            pass
    for i in range(len(data)):
        for flip in (0x01, 0x80):
            mutated = bytearray(data)
            mutated[i] ^= flip
            try:
                decode_model_proto(bytes(mutated))
            except GemmaQuantError:
                pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_parse_or_raise_gemmaquant_error(data):
    try:
        m = decode_model_proto(data)
    except GemmaQuantError:
        return
    assert m.pieces


def test_encoder_refuses_bad_input():
    with pytest.raises(GemmaQuantError, match="type 7"):
        encode_model_proto([("a", 0.0, 7)])
    with pytest.raises(GemmaQuantError, match="unknown SentencePiece trainer option"):
        encode_model_proto([("a", 0.0, 1)], split_digits=True)
    with pytest.raises(GemmaQuantError, match="model_type 'wordpiece'"):
        encode_model_proto([("a", 0.0, 1)], model_type="wordpiece")
