"""Calibration token batches: a user text file or the packaged default text, cut into BOS-led windows.

Each sample is [BOS] + (seq_len − 1) consecutive tokens of the text, as a model sees a document start.
Windows are non-overlapping when the text is long enough and are drawn at seeded random offsets;
a shorter text is reused (overlapping windows) with a note; a text shorter than one window is an error.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from ..errors import GemmaQuantError

DEFAULT_NAME = "default_calib.txt"


def default_text() -> str:
    return resources.files(__package__).joinpath(DEFAULT_NAME).read_text(encoding="utf-8")


def read_text(path: Path) -> str:
    """A UTF-8 text file; empty, binary or undecodable files are user errors naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GemmaQuantError(f"{path}: calibration file not found") from None
    except IsADirectoryError:
        raise GemmaQuantError(f"{path}: expected a text file for --calib, got a directory") from None
    except OSError as e:
        raise GemmaQuantError(f"{path}: cannot read calibration file ({e.strerror})") from None
    if not data.strip():
        raise GemmaQuantError(f"{path}: calibration file is empty")
    if b"\x00" in data:
        raise GemmaQuantError(f"{path}: calibration file looks binary (NUL bytes); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GemmaQuantError(f"{path}: calibration file is not UTF-8 text (bad byte at offset {e.start})") from None


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids without BOS, from our tokenizer (`encode(text, add_bos=)`) or a `tokenizers.Tokenizer`."""
    try:
        return list(tokenizer.encode(text, add_bos=False))
    except TypeError:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)


def _bos_id(tokenizer, bos_id: int | None) -> int:
    if bos_id is not None:
        return bos_id
    for attr in ("bos_id", "bos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    tid = getattr(tokenizer, "token_to_id", lambda _t: None)("<bos>")
    return 2 if tid is None else tid  # Gemma's <bos>


def calibration_batches(tokenizer, path: Path | None, n_samples: int = 128, seq_len: int = 512,
                        seed: int = 0, *, bos_id: int | None = None,
                        notes: list[str] | None = None) -> torch.Tensor:
    """→ int64 [n_samples, seq_len], BOS first in each row. `notes` receives remarks (text reuse)."""
    if n_samples < 1:
        raise GemmaQuantError(f"--calib-samples must be at least 1, got {n_samples}")
    if seq_len < 2:
        raise GemmaQuantError(f"--calib-len must be at least 2, got {seq_len}")
    what = str(path) if path is not None else f"the default calibration text ({DEFAULT_NAME})"
    text = read_text(path) if path is not None else default_text()
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    span = seq_len - 1
    if len(ids) < span:
        raise GemmaQuantError(
            f"{what}: {len(ids)} tokens, fewer than one --calib-len {seq_len} window needs ({span}); "
            "give more text or a shorter --calib-len")
    g = torch.Generator().manual_seed(seed)
    n_disjoint = len(ids) // span
    if n_disjoint >= n_samples:
        slack = len(ids) - n_disjoint * span  # random shift so the windows do not always start at 0
        shift = int(torch.randint(0, slack + 1, (1,), generator=g))
        chunk = torch.randperm(n_disjoint, generator=g)[:n_samples]
        starts = shift + chunk * span
    else:
        starts = torch.randint(0, len(ids) - span + 1, (n_samples,), generator=g)
        if notes is not None:
            notes.append(f"{what}: {len(ids)} tokens give only {n_disjoint} distinct windows of {seq_len}; "
                         f"{n_samples} samples reuse text (overlapping windows)")
    rows = torch.stack([ids[s:s + span] for s in starts.tolist()])
    bos = torch.full((n_samples, 1), _bos_id(tokenizer, bos_id), dtype=torch.long)
    return torch.cat([bos, rows], dim=1)


def load_tokenizer_for(model_dir: Path):
    """The project tokenizer if available, else `tokenizers` on tokenizer.json."""
    try:
        from ..tokenizer import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer(model_dir)
    p = Path(model_dir) / "tokenizer.json"
    if not p.is_file():
        raise GemmaQuantError(f"{model_dir}: no tokenizer.json; calibration needs the model's tokenizer")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(p))
