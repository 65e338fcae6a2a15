"""docs/ is part of the repository's truth: every `docs/<page>.md §N` the code cites, and every link
between the pages, points at a page and a section that exist; and nothing the repository ships names
a path of the development machines."""

from __future__ import annotations

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/([a-z0-9-]+\.md)((?:[ ,]*§\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?)*)")
LINK = re.compile(r"\]\(([a-z0-9-]+\.md)?(#[a-z0-9-]+)?\)")
# Shipped data, not the repository's prose: the calibration text's code samples name their own fictional
# projects' docs/ pages. They are still searched for machine paths.
DATA_TEXTS = {ROOT / "gemmaquant" / "calib" / "default_calib.txt",
              ROOT / "gemmaquant" / "formats" / "texts" / "default_eval.txt"}


def _tracked() -> list[Path]:
    """The repository's own files: its folders and top-level files (not .git, venvs or build output)."""
    files = [p for p in ROOT.iterdir() if p.is_file() and not p.name.startswith(".git")]
    for d in ("gemmaquant", "tests", "benchmarks", "docs", "recipes", ".ci"):
        files += [p for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [p for p in files if p.suffix in (".py", ".md", ".toml", ".txt", ".sh", ".cfg", "")]


def _text_files() -> list[tuple[Path, str]]:
    out = []
    for p in _tracked():
        try:
            out.append((p, p.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    return out


def _headings(page: Path) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)]


def _section_numbers(page: Path) -> set[str]:
    """"1.2" for a heading `### 1.2 Hyperparameter keys`, "4" for `## 4. Which type ...`."""
    return {m.group(1) for h in _headings(page) if (m := re.match(r"(\d+(?:\.\d+)*)\.? ", h))}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_docs_citation_resolves():
    seen = 0
    for path, text in _text_files():
        if path in DATA_TEXTS:
            continue
        for m in CITATION.finditer(text):
            page = ROOT / "docs" / m.group(1)
            where = f"{path.relative_to(ROOT)}: docs/{m.group(1)}{m.group(2)}"
            assert page.is_file(), f"{where}: no such page"
            numbers = _section_numbers(page)
            for ref in re.findall(r"§(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?", m.group(2)):
                for n in filter(None, ref):
                    assert n in numbers, f"{where}: no section {n} (sections: {sorted(numbers)})"
            seen += 1
    assert seen >= 15  # the code does cite the pages


def test_links_between_pages_resolve():
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert {p.name for p in pages} >= {"gguf-gemma.md", "vllm-formats.md", "numerics.md", "architecture.md",
                                       "demo-model.md"}
    for page in pages:
        for target, anchor in LINK.findall(page.read_text(encoding="utf-8")):
            dest = ROOT / "docs" / target if target else page
            assert dest.is_file(), f"{page.name}: link to missing {target}"
            if anchor:
                assert anchor[1:] in {_slug(h) for h in _headings(dest)}, f"{page.name}: no {target}{anchor}"


def test_no_path_of_the_development_machines():
    # Built from parts so that this file does not match itself.
    machine = re.compile("|".join(re.escape(p) for p in ("/" + "work/", "/" + "root/", "/" + "home/")))
    found = [f"{p.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
             for p, text in _text_files() for m in machine.finditer(text)]
    assert not found, found
