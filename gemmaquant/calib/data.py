"""Calibration token batches: a user text file or the packaged default text, cut into BOS-led windows.

Each sample is [BOS] + (seq_len − 1) consecutive tokens of the text, as a model sees a document start.
Windows are non-overlapping when the text is long enough and are drawn at seeded random offsets;
a shorter text is reused (overlapping windows) with a note; a text shorter than one window is an error.
A file is read in pieces only until it holds CALIB_SPREAD times the tokens the samples take.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from ..errors import GemmaQuantError
from ..formats.texts import Text, named_text

DEFAULT_NAME = "default_calib.txt"
CALIB_SPREAD = 4  # a calibration file is read until it holds this many times the tokens the samples take


def default_text() -> str:
    return builtin_calib_path().read_text(encoding="utf-8")


def builtin_calib_path() -> Path:
    """Where the shipped calibration text lives (inside the installed package)."""
    return Path(str(resources.files(__package__).joinpath(DEFAULT_NAME)))


def calib_text(path: str | Path | None = None) -> Text:
    """`--calib PATH`, or the shipped calibration text when None (imatrix, calibrated schemes), named
    and hashed before any model loads (formats/texts)."""
    if path is None:
        return named_text(f"built-in:{DEFAULT_NAME}", builtin_calib_path(), True, "--calib")
    return named_text(str(path), Path(path), False, "--calib")


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
    span = seq_len - 1
    if path is not None:
        from ..formats.inputs import encode_text

        # windows are drawn from the first CALIB_SPREAD x (what the samples take) tokens: a 200 MB
        # file costs what a 1 MB one does, and a text shorter than that is used whole, as before
        got = encode_text(path, "--calib", lambda t: _encode(tokenizer, t), need=CALIB_SPREAD * n_samples * span)
        ids = torch.tensor(got.ids, dtype=torch.long)
    else:
        ids = torch.tensor(_encode(tokenizer, default_text()), dtype=torch.long)
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


def load_tokenizer_for(model_dir: Path, rows: int | None = None):
    """The model's tokenizer (tokenizer.json or tokenizer.model); `rows`: its embedding rows, checked
    against the tokenizer's size."""
    from ..formats.tokenizer import load_tokenizer

    return load_tokenizer(model_dir, rows=rows)
