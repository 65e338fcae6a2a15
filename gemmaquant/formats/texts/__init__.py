"""The texts a command measures or calibrates on, named so that numbers can be matched to them.

Two texts ship with the package and share no document:
- `formats/texts/default_eval.txt`: what `eval` and `compare` measure on without `--text` (five licence
  documents, copied verbatim under their own terms: see NOTICE.md beside it);
- `calib/default_calib.txt`: what calibration and `imatrix` use without `--calib` (calib/data.py names
  it, with `named_text`).
Drift measured on the text a quantizer was calibrated on would flatter it, hence two texts.

Every output that reports a measurement names its text and a sha256: two perplexities are comparable
only if those match. A `Text` holds no content, only where the file is. Naming a text (before any model
loads) checks that it is a regular file and hashes its bytes, streaming, up to the cap any command
reads (inputs.TEXT_CAP_BYTES); tokenizing reads it again, piece by piece, only as far as the command
needs (`Text.encode` → `inputs.encode_text`), and that is where its content is checked (UTF-8, no NUL,
not empty). A 200 MB text costs a bounded stream of 32 MiB for the hash, never a copy in memory, and
`eval --chunks 1` never decodes more than its chunk takes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .. import inputs
from ...errors import GemmaQuantError

EVAL_NAME = "default_eval.txt"
_BLOCK = 1 << 20  # bytes hashed at a time


@dataclass(frozen=True)
class Text:
    """A text file named for outputs.

    sha256 is of the file's raw bytes as far as any command reads them: the whole file, or, for a file
    larger than inputs.TEXT_CAP_BYTES (32 MiB), its first TEXT_CAP_BYTES (`used_bytes` says how many;
    the output then says so too). For any file under the cap it is what `sha256sum FILE` prints. It does
    not depend on how much of the text a run tokenizes (`--chunks`), so runs on the same file match."""

    name: str  # the user's path as given, or "built-in:<file>" for a shipped text
    path: Path  # the file read (a shipped text is a file inside the installed package)
    sha256: str
    builtin: bool
    option: str  # the option that named it ("--text", "--calib"), for messages
    file_bytes: int
    used_bytes: int

    @property
    def capped(self) -> bool:
        return self.used_bytes < self.file_bytes

    def describe(self) -> str:
        """`name (sha256 1234abcd5678)`: short enough for a table title, enough to tell texts apart."""
        cut = f", its first {inputs.human_size(self.used_bytes)}" if self.capped else ""
        return f"{self.name} (sha256 {self.sha256[:12]}{cut})"

    def to_dict(self) -> dict:
        d = {"text": self.name, "text_sha256": self.sha256}
        if self.capped:  # the sha256 is of this many leading bytes, not of the whole file
            d["text_bytes_used"] = self.used_bytes
        return d

    def encode(self, encode: Callable[[str], list[int]], need: int | None = None) -> inputs.EncodedText:
        """Token ids (no BOS: `encode` must not add one), read piece by piece and only until `need`
        ids are there (None: the whole text, up to the cap)."""
        return inputs.encode_text(self.path, self.option, encode, need=need)


def named_text(name: str, path: Path, builtin: bool, option: str) -> Text:
    """Check that `path` is a regular file (a FIFO or device is refused without blocking) and hash its
    bytes up to the cap (read now: tests lower it), streaming in bounded blocks."""
    cap = inputs.TEXT_CAP_BYTES
    h = hashlib.sha256()
    used = 0
    with inputs.open_input(path, option) as f:
        size = os.fstat(f.fileno()).st_size
        while used < cap:
            try:
                block = f.read(min(_BLOCK, cap - used))
            except OSError as e:
                raise GemmaQuantError(f"{path}: cannot read it ({e.strerror or e})") from None
            if not block:
                break
            h.update(block)
            used += len(block)
    return Text(name, path, h.hexdigest(), builtin, option, max(size, used), used)


def builtin_eval_path() -> Path:
    """Where the shipped evaluation text lives (inside the installed package)."""
    return Path(str(resources.files(__package__).joinpath(EVAL_NAME)))


def eval_text(path: str | Path | None = None) -> Text:
    """`--text PATH` for eval/compare, or the shipped evaluation text when None. A path that is not a
    readable regular file is refused here, with one line naming it."""
    if path is None:
        return named_text(f"built-in:{EVAL_NAME}", builtin_eval_path(), True, "--text")
    return named_text(str(path), Path(path), False, "--text")
