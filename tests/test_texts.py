"""The shipped texts: the evaluation text is the five licence documents its NOTICE lists, byte for byte,
and shares nothing with the calibration text; outputs name any text by path (or built-in name) and sha256."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

import pytest

from gemmaquant.errors import GemmaQuantError
from gemmaquant.texts import builtin_eval_path, calib_text, eval_text

ROOT = Path(__file__).resolve().parents[1]
NOTICE = ROOT / "gemmaquant" / "texts" / "NOTICE.md"
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
    assert t.builtin and t.name == "built-in:default_eval.txt"
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
    text = eval_text().content
    grant = "Everyone is permitted to copy and distribute verbatim copies\n of this license document, but changing it is not allowed."
    assert text.count(grant) == 3


def _shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_eval_and_calibration_texts_share_no_document():
    # Drift measured on the text a quantizer was calibrated on would flatter it: not even a run of
    # 8 words is common to the two shipped texts.
    shared = _shingles(eval_text().content) & _shingles(calib_text().content)
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


def test_the_texts_are_package_data():
    pkg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert set(pkg["gemmaquant.texts"]) == {"default_eval.txt", "NOTICE.md"}
    assert pkg["gemmaquant.calib"] == ["default_calib.txt"]


def test_same_bytes_as_the_development_copy():
    """Optional: where the development machines' shared data is beside the repository, the shipped
    text is that file (every RESULTS.md figure naming dev-eval.txt was measured on it)."""
    dev = ROOT.parent / "shared" / "data" / "dev-eval.txt"
    if not dev.is_file():
        pytest.skip("no ../shared beside the repository (only on development machines)")
    assert dev.read_bytes() == builtin_eval_path().read_bytes()
