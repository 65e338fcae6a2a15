"""SentencePiece `ModelProto` (tokenizer.model) without protobuf: encode our vocabulary, decode any file.

Only the fields gemmaquant reads or writes are interpreted; every other field is skipped by its wire
type. Field numbers follow sentencepiece_model.proto:

    ModelProto      1 pieces (repeated SentencePiece)   2 trainer_spec   3 normalizer_spec
    SentencePiece   1 piece (string)   2 score (float)   3 type (enum, default NORMAL=1)
    TrainerSpec     3 model_type (UNIGRAM=1, BPE=2, WORD=3, CHAR=4)   4 vocab_size   35 byte_fallback
                    40 unk_id  41 bos_id  42 eos_id  43 pad_id  45 unk_piece  46 bos_piece
                    47 eos_piece  48 pad_piece
    NormalizerSpec  1 name   3 add_dummy_prefix   4 remove_extra_whitespaces   5 escape_whitespaces

Wire format: each field is a varint key `(number << 3) | wire_type`; wire types 0 varint, 1 fixed64,
2 length-delimited (strings, bytes, sub-messages), 5 fixed32 (float). Negative int32 values (pad_id
-1) are 10-byte varints of the 64-bit two's complement.

The decoder is fed untrusted files (and fuzzed): every read is bounds-checked against the buffer, each
step consumes at least one byte, varints are at most 10 bytes and nothing is allocated beyond slices
of the input, so bad bytes raise GemmaQuantError quickly instead of hanging or allocating.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import GemmaQuantError

# SentencePiece.Type (the same numbers GGUF uses in tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PIECE_TYPES = (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)
MODEL_TYPES = {"unigram": 1, "bpe": 2, "word": 3, "char": 4}

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_F32 = struct.Struct("<f")


@dataclass
class SpmModel:
    """What gemmaquant needs from a tokenizer.model. Absent fields take the proto's defaults."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type) in id order
    model_type: int = 1  # UNIGRAM
    vocab_size: int = 8000
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"
    normalizer_name: str = ""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


# -- encoding ---------------------------------------------------------------------------------------
def _varint(v: int) -> bytes:
    if v < 0:
        v &= (1 << 64) - 1  # int32/int64 negatives: 64-bit two's complement, 10 bytes
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, _LEN) + _varint(len(payload)) + payload


def _int_field(number: int, v: int) -> bytes:
    return _key(number, _VARINT) + _varint(int(v))


_TRAINER_INTS = {"vocab_size": 4, "unk_id": 40, "bos_id": 41, "eos_id": 42, "pad_id": 43}
_TRAINER_STRS = {"unk_piece": 45, "bos_piece": 46, "eos_piece": 47, "pad_piece": 48}


def encode_model_proto(pieces: list[tuple[str, float, int]], **trainer_opts) -> bytes:
    """Serialize a BPE (default) SentencePiece model with an identity normalizer.

    trainer_opts: model_type ("bpe" | "unigram" | ... or its number), vocab_size (default len(pieces)),
    byte_fallback (default True), unk_id/bos_id/eos_id/pad_id and unk_piece/bos_piece/eos_piece/
    pad_piece (written only when given; sentencepiece finds bos/eos/pad by these piece names, so
    Gemma passes "<bos>", "<eos>", "<pad>", "<unk>").
    The normalizer never rewrites text (name "identity", no dummy prefix, spaces kept; spaces are
    still escaped to ▁ as Gemma's own tokenizer.model does).
    """
    opts = dict(trainer_opts)
    model_type = opts.pop("model_type", "bpe")
    if isinstance(model_type, str):
        if model_type.lower() not in MODEL_TYPES:
            raise GemmaQuantError(f"model_type {model_type!r} is unknown; allowed: {', '.join(MODEL_TYPES)}")
        model_type = MODEL_TYPES[model_type.lower()]
    opts.setdefault("vocab_size", len(pieces))
    byte_fallback = bool(opts.pop("byte_fallback", True))
    unknown = set(opts) - set(_TRAINER_INTS) - set(_TRAINER_STRS)
    if unknown:
        raise GemmaQuantError(f"unknown SentencePiece trainer option(s) {sorted(unknown)}; "
                              f"allowed: model_type, byte_fallback, {', '.join([*_TRAINER_INTS, *_TRAINER_STRS])}")

    out = bytearray()
    key_piece, key_score, key_type = _key(1, _LEN), _key(2, _FIXED32), _key(3, _VARINT)
    for i, (piece, score, ptype) in enumerate(pieces):
        if ptype not in PIECE_TYPES:
            raise GemmaQuantError(f"piece {i} ({piece!r}): type {ptype} is not a SentencePiece type; "
                                  f"allowed: {PIECE_TYPES}")
        raw = piece.encode("utf-8")
        body = key_piece + _varint(len(raw)) + raw + key_score + _F32.pack(score)
        if ptype != NORMAL:  # NORMAL is the default: protobuf writers leave it out
            body += key_type + _varint(ptype)
        out += _len_field(1, body)

    trainer = _int_field(3, model_type) + _int_field(4, opts["vocab_size"]) + _int_field(35, byte_fallback)
    for name in ("unk_id", "bos_id", "eos_id", "pad_id"):
        if name in opts:
            trainer += _int_field(_TRAINER_INTS[name], opts[name])
    for name in ("unk_piece", "bos_piece", "eos_piece", "pad_piece"):
        if name in opts:
            trainer += _len_field(_TRAINER_STRS[name], str(opts[name]).encode("utf-8"))
    out += _len_field(2, trainer)

    normalizer = (_len_field(1, b"identity") + _int_field(3, 0) + _int_field(4, 0) + _int_field(5, 1))
    out += _len_field(3, normalizer)
    return bytes(out)


# -- decoding ---------------------------------------------------------------------------------------
class _Reader:
    """Bounds-checked protobuf field iterator over data[start:end]."""

    __slots__ = ("data", "pos", "end", "what")

    def __init__(self, data: bytes, start: int, end: int, what: str):
        self.data, self.pos, self.end, self.what = data, start, end, what

    def _fail(self, problem: str):
        raise GemmaQuantError(f"{self.what}: not a SentencePiece model: {problem} at byte {self.pos}")

    def varint(self) -> int:
        data, pos, end = self.data, self.pos, self.end
        result = shift = 0
        while True:
            if pos >= end:
                self._fail("truncated varint")
            b = data[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift >= 70:
                self._fail("varint longer than 10 bytes")
        self.pos = pos
        return result & ((1 << 64) - 1)

    def field(self) -> tuple[int, int, object]:
        """Read one field: (number, wire_type, value); value is an int for varints, else the
        (start, end) span of its bytes. Always consumes at least one byte."""
        key = self.varint()
        number, wire = key >> 3, key & 7
        if number == 0:
            self._fail("field number 0")
        if wire == _VARINT:
            return number, wire, self.varint()
        if wire == _LEN:
            n = self.varint()
            if n > self.end - self.pos:
                self._fail(f"length {n} runs past the end of the message")
        elif wire in (_FIXED32, _FIXED64):
            n = 4 if wire == _FIXED32 else 8
            if n > self.end - self.pos:
                self._fail("truncated fixed-size field")
        else:  # 3/4 are deprecated groups, 6/7 do not exist
            self._fail(f"unsupported wire type {wire} (field {number})")
        start = self.pos
        self.pos += n
        return number, wire, (start, self.pos)

    def fields(self):
        while self.pos < self.end:
            yield self.field()


def _text(data: bytes, span: tuple[int, int], what: str) -> str:
    try:
        return data[span[0]:span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise GemmaQuantError(f"{what}: not a SentencePiece model: a string at byte {span[0]} is not UTF-8") from None


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF  # protobuf int32 keeps the low 32 bits of the 64-bit varint
    return v - (1 << 32) if v >= 1 << 31 else v


def _expect(wire: int, want: int, what: str, name: str):
    if wire != want:
        raise GemmaQuantError(f"{what}: not a SentencePiece model: field {name} has wire type {wire}, expected {want}")


def _decode_piece(data: bytes, span: tuple[int, int], index: int, what: str) -> tuple[str, float, int]:
    s, e = span
    # Fast path for the layout every protobuf writer emits for short pieces (a 262k-piece vocabulary
    # decodes several times faster, RESULTS.md §8): 0x0A <len < 128> <utf-8>  0x15 <f32 score>
    # [0x18 <type < 128>]. Anything else takes
    # the general field loop below.
    if e - s >= 7 and data[s] == 0x0A and data[s + 1] < 0x80:
        p = s + 2 + data[s + 1]
        if p + 5 == e or (p + 7 == e and data[p + 5] == 0x18 and data[p + 6] < 0x80):
            if data[p] == 0x15:
                ptype = data[p + 6] if p + 7 == e else NORMAL
                if ptype in PIECE_TYPES:
                    return _text(data, (s + 2, p), what), _F32.unpack_from(data, p + 1)[0], ptype
    piece, score, ptype = None, 0.0, NORMAL
    for number, wire, value in _Reader(data, span[0], span[1], what).fields():
        if number == 1:
            _expect(wire, _LEN, what, "SentencePiece.piece")
            piece = _text(data, value, what)
        elif number == 2:
            _expect(wire, _FIXED32, what, "SentencePiece.score")
            score = _F32.unpack_from(data, value[0])[0]
        elif number == 3:
            _expect(wire, _VARINT, what, "SentencePiece.type")
            ptype = _int32(value)
            if ptype not in PIECE_TYPES:
                raise GemmaQuantError(f"{what}: piece {index} has type {ptype}; allowed: {PIECE_TYPES}")
    if piece is None:
        raise GemmaQuantError(f"{what}: piece {index} has no text")
    return piece, score, ptype


def decode_model_proto(data: bytes, what: str = "tokenizer.model") -> SpmModel:
    """Parse a serialized SentencePiece ModelProto. `what` names the source in error messages."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise GemmaQuantError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    model = SpmModel(pieces=[])
    reader = _Reader(data, 0, len(data), what)
    end = len(data)
    while reader.pos < end:
        pos = reader.pos
        # Fast path: a pieces entry (key 0x0A) shorter than 128 bytes, i.e. nearly all of them.
        if data[pos] == 0x0A and pos + 1 < end and data[pos + 1] < 0x80:
            reader.pos = pos + 2 + data[pos + 1]
            if reader.pos > end:
                reader.pos = pos
                reader._fail("a piece runs past the end of the file")
            model.pieces.append(_decode_piece(data, (pos + 2, reader.pos), len(model.pieces), what))
            continue
        number, wire, value = reader.field()
        if number == 1:
            _expect(wire, _LEN, what, "ModelProto.pieces")
            model.pieces.append(_decode_piece(data, value, len(model.pieces), what))
        elif number == 2:
            _expect(wire, _LEN, what, "ModelProto.trainer_spec")
            _decode_trainer(data, value, model, what)
        elif number == 3:
            _expect(wire, _LEN, what, "ModelProto.normalizer_spec")
            _decode_normalizer(data, value, model, what)
    if not model.pieces:
        raise GemmaQuantError(f"{what}: not a SentencePiece model: it has no pieces")
    return model


def _decode_trainer(data: bytes, span, model: SpmModel, what: str):
    ints = {v: k for k, v in _TRAINER_INTS.items()}
    strs = {v: k for k, v in _TRAINER_STRS.items()}
    for number, wire, value in _Reader(data, span[0], span[1], what).fields():
        if number == 3:
            _expect(wire, _VARINT, what, "TrainerSpec.model_type")
            model.model_type = _int32(value)
        elif number == 35:
            _expect(wire, _VARINT, what, "TrainerSpec.byte_fallback")
            model.byte_fallback = value != 0
        elif number in ints:
            _expect(wire, _VARINT, what, f"TrainerSpec.{ints[number]}")
            setattr(model, ints[number], _int32(value))
        elif number in strs:
            _expect(wire, _LEN, what, f"TrainerSpec.{strs[number]}")
            setattr(model, strs[number], _text(data, value, what))


def _decode_normalizer(data: bytes, span, model: SpmModel, what: str):
    bools = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for number, wire, value in _Reader(data, span[0], span[1], what).fields():
        if number == 1:
            _expect(wire, _LEN, what, "NormalizerSpec.name")
            model.normalizer_name = _text(data, value, what)
        elif number in bools:
            _expect(wire, _VARINT, what, f"NormalizerSpec.{bools[number]}")
            setattr(model, bools[number], value != 0)
