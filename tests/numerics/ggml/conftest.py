"""Fixtures of the GGML tests (the type families, the compiled and native quantizers)."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.numerics.ggml import native
from tests.numerics.ggml.libggml import ggml_quantize_init


@pytest.fixture(autouse=True)
def plain_quantizers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """These modules check the plain torch quantizers against libggml, so the native C ones (the default
    wherever a C compiler exists) are off here; a module that tests them says `NATIVE = True`."""
    if not getattr(request.module, "NATIVE", False):
        monkeypatch.setenv(native.ENV, "0")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: results never depend on it, and a loaded 2-core box
    runs these small searches faster so."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def c_tables(request: pytest.FixtureRequest) -> None:
    """llama.cpp builds its grid tables on first use (seconds; IQ1's ~15-40 s on this machine): once
    per module for the module's `TYPES`, as setup, not inside the first test."""
    for qtype in request.module.TYPES:
        ggml_quantize_init(qtype)
