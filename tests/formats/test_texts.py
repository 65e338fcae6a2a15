"""The shipped texts: the evaluation text is the five licence documents its NOTICE lists, byte for byte,
and shares nothing with the calibration text; outputs name any text by path (or built-in name) and sha256."""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from pathlib import Path

import pytest

from gemmaquant.formats import inputs
from gemmaquant.errors import GemmaQuantError
from gemmaquant.calib.data import calib_text
from gemmaquant.formats.texts import builtin_eval_path, eval_text

ROOT = Path(__file__).resolve().parents[2]
NOTICE = ROOT / "gemmaquant" / "formats" / "texts" / "NOTICE.md"
EVAL_SHA256 = "09ac424f3d8c0f36cef1d4c0a06adb1d5fd6a609f1b66e416ba317e8a6bfb80d"
# (first line, bytes, sha256) of each document, in file order (Debian's /usr/share/common-licenses copies)
DOCUMENTS = [
    ("GNU GENERAL PUBLIC LICENSE", 18092, "8177f97513213526df2cf6184d8ff986c675afb514d4e68a404010521b880643"),
    ("GNU LESSER GENERAL PUBLIC LICENSE", 26530, "dc626520dcd53a22f727af3ee42c770e56c97a64fe3adb063799d8ab032fe551"),
    ("Mozilla Public License Version 2.0", 16726, "fab3dd6bdab226f1c08630b1dd917e11fcb4ec5e1e020e2c16f83a0a13863e85"),
    ("GNU Free Documentation License", 22955, "110535522396708cea37c72a802c5e7e81391139f5f7985631c93ef242b206a4"),
    ('The "Artistic License"', 6111, "b7fd9b73ea99602016a326e0b62e6646060d18febdd065ceca8bb482208c3d88"),
]


def test_builtin_eval_text_is_named_and_hashed():
    t = eval_text()
    assert t.builtin and t.name == "built-in:default_eval.txt" and t.path == builtin_eval_path()
    assert t.sha256 == EVAL_SHA256 == hashlib.sha256(builtin_eval_path().read_bytes()).hexdigest()
    assert t.describe() == f"built-in:default_eval.txt (sha256 {EVAL_SHA256[:12]})"
    assert t.to_dict() == {"text": "built-in:default_eval.txt", "text_sha256": EVAL_SHA256}


def test_the_file_is_the_documents_the_notice_lists():
    data = builtin_eval_path().read_bytes()
    notice = NOTICE.read_text()
    assert EVAL_SHA256 in notice and f"{len(data):,} bytes" in notice
    start = 0
    for title, size, sha in DOCUMENTS:
        doc = data[start:start + size]
        assert doc.decode().lstrip().startswith(title), title
        assert hashlib.sha256(doc).hexdigest() == sha, title
        assert sha in notice and f"{size:,}" in notice, title
        start += size
    assert start == len(data)  # nothing else in the file


def test_fsf_documents_carry_their_verbatim_copying_permission():
    # The basis the NOTICE gives for GPL-2.0, LGPL-2.1 and GFDL-1.3: their own words, kept verbatim.
    text = eval_text().path.read_text(encoding="utf-8")
    grant = "Everyone is permitted to copy and distribute verbatim copies\n of this license document, but changing it is not allowed."
    assert text.count(grant) == 3


def _shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_eval_and_calibration_texts_share_no_document():
    # Drift measured on the text a quantizer was calibrated on would flatter it: not even a run of
    # 8 words is common to the two shipped texts.
    shared = _shingles(eval_text().path.read_text(encoding="utf-8")) & \
        _shingles(calib_text().path.read_text(encoding="utf-8"))
    assert not shared, sorted(shared)[:5]


def test_a_user_text_is_named_by_its_path(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("Some text of my own.\n", encoding="utf-8")
    t = eval_text(p)
    assert not t.builtin and t.name == str(p)
    assert t.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    c = calib_text(p)
    assert c.name == str(p) and c.sha256 == t.sha256
    assert calib_text().name == "built-in:default_calib.txt"
    with pytest.raises(GemmaQuantError, match="missing.txt"):
        eval_text(tmp_path / "missing.txt")


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "must be a regular file, this is a directory"),
    (lambda p: os.mkfifo(p), "must be a regular file, this is a FIFO"),
])
def test_naming_a_text_checks_the_file(tmp_path, make, match):
    """Naming a text (what eval/compare/imatrix/quantize do before loading a model) goes through the
    input check: a FIFO is refused at once instead of blocking, a directory or a missing file too."""
    p = tmp_path / "t.txt"
    make(p)
    for named in (eval_text, calib_text):
        with pytest.raises(GemmaQuantError, match=match):
            named(p)


@pytest.mark.parametrize("data, match", [
    (b"text\x00more", "looks binary"), (b"caf\xe9\n", "not UTF-8"), (b" \n\n", "empty")])
def test_a_texts_content_is_checked_where_it_is_tokenized(tmp_path, data, match):
    p = tmp_path / "t.txt"
    p.write_bytes(data)
    t = eval_text(p)  # named and hashed: its bytes are whatever they are
    assert t.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(GemmaQuantError, match=match):
        t.encode(str.split)


def test_the_sha256_of_a_text_over_the_cap_covers_what_is_read(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(inputs, "TEXT_CAP_BYTES", 4096)
    monkeypatch.setattr(inputs, "PIECE_CHARS", 1000)
    p = tmp_path / "big.txt"
    p.write_bytes(b"the cat sat on the mat.\n" * 2000)  # 48000 bytes
    with caplog.at_level("WARNING", logger="gemmaquant"):
        t = eval_text(p)
        got = t.encode(str.split)  # the whole (capped) text, read in pieces
        t.encode(str.split)
    assert t.file_bytes == 48000 and t.used_bytes == 4096 and t.capped
    assert t.sha256 == hashlib.sha256(p.read_bytes()[:4096]).hexdigest()
    assert t.to_dict() == {"text": str(p), "text_sha256": t.sha256, "text_bytes_used": 4096}
    assert t.describe() == f"{p} (sha256 {t.sha256[:12]}, its first 4 KiB)"
    assert got.ids == p.read_bytes()[:4096].decode().split()  # tokenized up to the same cap
    assert caplog.text.count("read only the first 4 KiB") == 1  # said once, not once per read


def test_a_text_under_the_cap_is_hashed_whole_and_tokenized_only_as_needed(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "PIECE_CHARS", 1000)
    p = tmp_path / "t.txt"
    p.write_bytes(b"one two three four.\n" * 5000)
    t = calib_text(p)
    assert not t.capped and t.used_bytes == t.file_bytes == 100000
    assert t.to_dict() == {"text": str(p), "text_sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    got = t.encode(str.split, need=10)
    assert got.read.stopped and got.read.bytes_read <= 2 * 1000 and got.ids[:4] == ["one", "two", "three", "four."]


def test_the_texts_are_package_data():
    pkg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert set(pkg["gemmaquant.formats.texts"]) == {"default_eval.txt", "NOTICE.md"}
    assert pkg["gemmaquant.calib"] == ["default_calib.txt"]


def test_same_bytes_as_the_development_copy():
    """Optional: where the development machines' shared data is beside the repository, the shipped
    text is that file (every RESULTS.md figure naming dev-eval.txt was measured on it)."""
    dev = ROOT.parent / "shared" / "data" / "dev-eval.txt"
    if not dev.is_file():
        pytest.skip("no ../shared beside the repository (only on development machines)")
    assert dev.read_bytes() == builtin_eval_path().read_bytes()
