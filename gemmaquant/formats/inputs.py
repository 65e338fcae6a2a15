"""Input files, checked one way everywhere: a named input must be a regular file, small structured
files are read with a size cap, and texts are read in pieces and tokenized only as far as needed.

    check_input_file(path, "--text")        before any model is loaded: a FIFO would block open()
                                            forever, /dev/zero never ends, a directory is a mistake
    read_json(path) / read_toml(path)       one line naming the file for anything malformed,
                                            nesting too deep included (no RecursionError traceback)
    encode_text(path, "--text", encode, need=N)
                                            the text's token ids, read in pieces, stopping once N
                                            tokens are there, never more than TEXT_CAP_BYTES of it

Pieces end after a newline that is followed by a non-blank character. Gemma's tokenizer matches
newline runs as whole added tokens, which split the text before BPE sees it, so tokenizing piece by
piece gives the same ids as tokenizing the whole text (tests/formats/test_inputs.py checks it on the demo's
tokenizer). A line longer than a piece is cut before a space, where the ids may differ locally.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import GemmaQuantError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_JSON_BYTES = 256 << 20  # config/tokenizer JSON: Gemma's tokenizer.json is 16-33 MB
MAX_TOML_BYTES = 1 << 20  # a recipe is a few hundred bytes
TEXT_CAP_BYTES = 32 << 20  # ~8 M tokens: hours of perplexity on a 270M model, far beyond calibration
PIECE_CHARS = 1 << 20  # text is decoded and tokenized a piece of ~1 M characters at a time
log = logging.getLogger("gemmaquant")


def human_bytes(n: float, digits: int = 1) -> str:
    """1.5 MB, 27.3 GB: sizes of models and outputs, decimal units as the Hub and `ls --si` show them
    (human_size below is for input limits, which are powers of two)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def human_size(n: int) -> str:
    """4 KiB, 46.9 KiB, 32 MiB: sizes in messages."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def kind_of(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for messages."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_input_file(path: str | Path, option: str) -> Path:
    """`path` must name an existing regular file (symlinks followed); else one line naming it and
    what it is. Call it before any expensive work: it never opens the file."""
    if str(path) == "":
        raise GemmaQuantError(f"{option}: the path is empty (give a file)")
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise GemmaQuantError(f"{p}: no such file ({option} must be a regular file)") from None
    except OSError as e:
        raise GemmaQuantError(f"{p}: cannot read it ({e.strerror or e}; {option} must be a readable regular file)") \
            from None
    if not stat.S_ISREG(st.st_mode):
        raise GemmaQuantError(f"{p}: {option} must be a regular file, this is {kind_of(st.st_mode)}")
    return p


def open_input(path: str | Path, option: str):
    """A binary file object for a regular file. Opened non-blocking and checked with fstat, so a
    FIFO swapped in after `check_input_file` is refused instead of blocking open()."""
    p = check_input_file(path, option)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise GemmaQuantError(f"{p}: cannot open it ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise GemmaQuantError(f"{p}: {option} must be a regular file, this is {kind_of(st.st_mode)}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | Path, what: str, limit: int) -> bytes:
    """The whole file, refused when larger than `limit` bytes (`what` names it in messages)."""
    with open_input(path, what) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise GemmaQuantError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > limit:
        raise GemmaQuantError(f"{path}: larger than the {human_size(limit)} a {what} may have")
    return data


def read_json(path: str | Path, what: str = "JSON file", limit: int = MAX_JSON_BYTES,
              expect: type | None = dict):
    """Parsed JSON (an object unless `expect` says otherwise)."""
    data = read_bytes(path, what, limit)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise GemmaQuantError(f"{path}: not valid JSON (not UTF-8 at byte {e.start})") from None
    except RecursionError:
        raise GemmaQuantError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and ints longer than Python's 4300-digit limit
        raise GemmaQuantError(f"{path}: not valid JSON ({e})") from None
    if expect is not None and not isinstance(value, expect):
        raise GemmaQuantError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                              f"got {type(value).__name__}")
    return value


def read_toml(path: str | Path, what: str = "TOML file", limit: int = MAX_TOML_BYTES) -> dict:
    data = read_bytes(path, what, limit)
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise GemmaQuantError(f"{path}: not valid TOML (not UTF-8 at byte {e.start})") from None
    except RecursionError:
        raise GemmaQuantError(f"{path}: not valid TOML (nested too deeply)") from None
    except ValueError as e:  # TOMLDecodeError
        raise GemmaQuantError(f"{path}: not valid TOML ({e})") from None


# -- texts ---------------------------------------------------------------------------------------------
@dataclass
class TextRead:
    """What `text_pieces` consumed: bytes read, the file's size, whether it stopped early and why."""

    path: Path
    file_bytes: int
    bytes_read: int = 0
    capped: bool = False  # stopped at TEXT_CAP_BYTES with more text left
    stopped: bool = False  # stopped because enough tokens were there

    def note(self) -> str | None:
        if self.capped:
            return (f"{self.path}: read only the first {human_size(self.bytes_read)} of its {human_size(self.file_bytes)} "
                    "(the most of a text gemmaquant uses); the rest is ignored")
        return None


_noted: set[tuple[str, int, int]] = set()


def _note_once(info: TextRead) -> None:
    """Say that a text was cut at the cap once per file and process: a command reads a text more than
    once (texts.Text hashes it before the model loads, tokenizing reads it again)."""
    key = (os.path.realpath(info.path), info.file_bytes, info.bytes_read)
    if key not in _noted:
        _noted.add(key)
        log.warning(info.note())


def _cut(buf: str) -> int:
    """Where a piece may end: after the last newline followed by a non-blank character, else
    before the last space preceded by a non-space; 0 when neither exists."""
    i = len(buf) - 1
    while True:
        i = buf.rfind("\n", 0, i)
        if i < 0:
            break
        if not buf[i + 1].isspace():
            return i + 1
    j = len(buf) - 1
    while True:
        j = buf.rfind(" ", 1, j)
        if j < 1:
            return 0
        if not buf[j - 1].isspace():
            return j


def text_pieces(path: str | Path, option: str, info: TextRead | None = None,
                cap: int | None = None, piece: int | None = None) -> Iterator[str]:
    """Decoded UTF-8 pieces of the text at `path`, in order; their concatenation is the text (up to
    `cap` bytes). Refuses NUL bytes, invalid UTF-8 and a text with nothing but whitespace, naming
    the byte offset. `info` (a TextRead) is updated as pieces are read. cap, piece: TEXT_CAP_BYTES
    and PIECE_CHARS unless given."""
    cap = TEXT_CAP_BYTES if cap is None else cap
    piece = PIECE_CHARS if piece is None else piece
    p = Path(path)
    with open_input(p, option) as f:
        size = os.fstat(f.fileno()).st_size
        if info is None:
            info = TextRead(p, size)
        info.file_bytes = size
        dec = codecs.getincrementaldecoder("utf-8")("strict")
        buf, seen_text, offset = "", False, 0
        while True:
            want = min(piece, cap - offset)
            raw = f.read(want) if want > 0 else b""
            end = not raw
            if raw:
                nul = raw.find(b"\x00")
                if nul >= 0:
                    raise GemmaQuantError(f"{p}: looks binary (NUL byte at offset {offset + nul}); "
                                          f"{option} needs UTF-8 text")
                pending = len(dec.getstate()[0])  # bytes of a character cut by the previous read
                try:
                    buf += dec.decode(raw)
                except UnicodeDecodeError as e:
                    raise GemmaQuantError(f"{p}: not UTF-8 text (invalid byte at offset {offset - pending + e.start}; "
                                          f"{option} needs UTF-8 text)") from None
                offset += len(raw)
                info.bytes_read = offset
            if end:
                if offset >= cap and f.read(1):
                    info.capped = True
                    _note_once(info)
                try:
                    dec.decode(b"", final=True)
                except UnicodeDecodeError:
                    if not info.capped:  # a cap may cut a character in two: drop it
                        raise GemmaQuantError(f"{p}: not UTF-8 text (the file ends inside a character)") from None
                if buf:
                    seen_text = seen_text or not buf.isspace()
                    if not seen_text:
                        break
                    yield buf
                break
            cut = _cut(buf) if len(buf) >= piece else 0
            if not cut and len(buf) >= 4 * piece:  # one huge "word": cut anyway, tokenizers stay bounded
                cut = piece
            if cut:
                head, buf = buf[:cut], buf[cut:]
                seen_text = seen_text or not head.isspace()
                if seen_text:
                    yield head
                else:  # leading whitespace only so far: keep it with what follows
                    buf = head + buf
        if not seen_text:
            raise GemmaQuantError(f"{p}: the text file is empty ({option} needs text)")


def read_text(path: str | Path, option: str = "--text") -> str:
    """A whole UTF-8 text (up to TEXT_CAP_BYTES), for scripts that want it as one string; refused as
    `text_pieces` refuses it (empty, binary, undecodable, not a regular file), naming `option`."""
    return "".join(text_pieces(path, option))


def encode_pieces(pieces, encode: Callable[[str], list[int]], need: int | None = None) -> tuple[list[int], bool]:
    """(ids, stopped early): `encode` (no BOS) applied piece by piece until at least `need` ids."""
    ids: list[int] = []
    for part in pieces:
        ids.extend(encode(part))
        if need is not None and len(ids) >= need:
            if hasattr(pieces, "close"):
                pieces.close()
            return ids, True
    return ids, False


@dataclass
class EncodedText:
    ids: list[int]
    read: TextRead


def encode_text(path: str | Path, option: str, encode: Callable[[str], list[int]], need: int | None = None,
                cap: int | None = None) -> EncodedText:
    """Token ids of the text at `path` (no BOS: `encode` must not add one), read piece by piece and
    stopping as soon as at least `need` ids are there (None: the whole text, up to `cap` bytes)."""
    info = TextRead(Path(path), 0)
    ids, info.stopped = encode_pieces(text_pieces(path, option, info, cap=cap), encode, need)
    return EncodedText(ids, info)
