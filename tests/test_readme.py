"""README.md stays true: its scheme table is the registry's, and CI runs its test command."""

from pathlib import Path

from gemmaquant.schemes import scheme_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_scheme_table_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- schemes:start -->\n")[1].split("<!-- schemes:end -->")[0]
    assert block == scheme_markdown(), "run: gemmaquant schemes --markdown, and paste it into README.md"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = "pip install torch==2.13.0 -e '.[dev]' && python -m pytest -q"
    assert cmd in readme and cmd in ci
