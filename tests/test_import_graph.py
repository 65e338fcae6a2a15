"""The package's shape holds (benchmarks/import_graph.py draws it): layers import downward only, no
import cycle (function-level imports count), no private name imported from another module, at most
six modules directly under gemmaquant/, the torch-free modules stay torch-free at import, one GGUF
parser and one shard-index reader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _graph_module():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "benchmarks" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def graph():
    """One parse of the package for the checks below (each parse takes most of a second)."""
    return _graph_module().Graph()


def test_every_module_sits_in_a_layer_and_imports_only_downward(graph):
    g = graph
    assert g.unplaced() == []
    assert g.upward() == []


def test_no_import_cycle(graph):
    assert graph.cycles() == []


def test_no_private_name_crosses_a_module(graph):
    assert graph.private == []


def test_at_most_six_modules_at_the_top(graph):
    assert len(graph.top_level_modules()) <= _graph_module().MAX_TOP_LEVEL == 6


def test_torch_free_modules_import_no_torch(graph):
    assert graph.torch_leaks() == []


def test_one_gguf_parser_and_one_shard_index_reader(graph):
    gguf, index = graph.readers()
    assert gguf == ["gemmaquant.formats.gguf.reader"]
    assert index == ["gemmaquant.formats.checkpoint"]


def test_the_script_reports_no_problem(capsys):
    assert _graph_module().main([]) == 0
    assert "all checks pass" in capsys.readouterr().out


def test_the_checks_catch_what_they_claim(tmp_path):
    """A package with an upward import, a cycle and a private import is reported on each count."""
    m = _graph_module()
    pkg = tmp_path / "gemmaquant"
    for d in ("formats", "cli"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "formats" / "a.py").write_text("from ..cli.b import thing\n_x = 1\n")
    (pkg / "cli" / "b.py").write_text("def f():\n    from ..formats.a import _x\nthing = 1\n")
    g = m.Graph(pkg)
    assert ("gemmaquant.formats.a", "gemmaquant.cli.b") in g.upward()
    assert ["gemmaquant.cli.b", "gemmaquant.formats.a"] in g.cycles()
    assert ("gemmaquant.cli.b", "gemmaquant.formats.a", "_x") in g.private
