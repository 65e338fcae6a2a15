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


QUICKSTART = ("pip install torch==2.13.0 -e '.[demo]' && gemmaquant quantize demo --scheme q6_k && "
              "gemmaquant compare demo gemma-3-270m.Q6_K.gguf")


def test_quick_start_needs_nothing_beside_the_clone():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- quickstart:start -->\n")[1].split("<!-- quickstart:end -->")[0]
    assert block == f"```bash\n{QUICKSTART}\n```\n"
    assert "../" not in block and "--text" not in block  # the built-in evaluation text, nothing outside


def test_ci_runs_the_quick_start_in_a_fresh_clone():
    ci = (ROOT / ".ci" / "run").read_text()
    quick = (ROOT / ".ci" / "quickstart").read_text()
    assert "bash .ci/quickstart" in ci
    assert "git clone" in quick and "mktemp -d" in quick and "python3 -m venv" in quick
    assert "<!-- quickstart:start -->" in quick and "<!-- quickstart:end -->" in quick
