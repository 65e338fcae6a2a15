"""The texts a command measures or calibrates on, named so that numbers can be matched to them.

Two texts ship with the package and share no document:
- `texts/default_eval.txt`: what `eval` and `compare` measure on without `--text` (five licence
  documents, copied verbatim under their own terms: see NOTICE.md beside it);
- `calib/default_calib.txt`: what calibration and `imatrix` use without `--calib`.
Drift measured on the text a quantizer was calibrated on would flatter it, hence two texts.

Every output that reports a measurement names its text and the sha256 of its UTF-8 bytes: two
perplexities are comparable only if those match.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

EVAL_NAME = "default_eval.txt"
CALIB_NAME = "default_calib.txt"


@dataclass(frozen=True)
class Text:
    name: str  # the user's path as given, or "built-in:<file>" for a shipped text
    content: str
    sha256: str  # of content.encode("utf-8")
    builtin: bool

    def describe(self) -> str:
        """`name (sha256 1234abcd5678)`: short enough for a table title, enough to tell texts apart."""
        return f"{self.name} (sha256 {self.sha256[:12]})"

    def to_dict(self) -> dict:
        return {"text": self.name, "text_sha256": self.sha256}


def _text(name: str, content: str, builtin: bool) -> Text:
    return Text(name, content, hashlib.sha256(content.encode("utf-8")).hexdigest(), builtin)


def builtin_eval_path() -> Path:
    """Where the shipped evaluation text lives (inside the installed package)."""
    return Path(str(resources.files(__package__).joinpath(EVAL_NAME)))


def eval_text(path: str | Path | None = None) -> Text:
    """`--text PATH` for eval/compare, or the shipped evaluation text when None."""
    if path is None:
        content = resources.files(__package__).joinpath(EVAL_NAME).read_text(encoding="utf-8")
        return _text(f"built-in:{EVAL_NAME}", content, True)
    from ..perplexity import read_text

    return _text(str(path), read_text(path), False)


def calib_text(path: str | Path | None = None) -> Text:
    """`--calib PATH`, or the shipped calibration text when None (imatrix, calibrated schemes)."""
    if path is None:
        from ..calib.data import default_text

        return _text(f"built-in:{CALIB_NAME}", default_text(), True)
    from ..calib.data import read_text

    return _text(str(path), read_text(Path(path)), False)
