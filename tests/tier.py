"""The fast tier (`pytest -m "not slow"`) must not reach llama.cpp, the demo model or a child process.

conftest.py marks such tests `slow` (by marker or fixture) and, while an unmarked test runs, sets
`FAST` to its node id; the helpers that reach for those things call `forbid()`, so a test that does so
without its mark fails with the mark it needs instead of silently slowing the fast tier down."""

from __future__ import annotations

import pytest

FAST: str | None = None  # node id of the running fast-tier test, else None


def forbid(what: str, mark: str) -> None:
    if FAST is not None:
        pytest.fail(f"{FAST} uses {what} but is in the fast tier: mark it @pytest.mark.{mark} "
                    "(conftest.py then makes it slow)", pytrace=False)
