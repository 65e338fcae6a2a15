"""The CLI draws the progress of calibration passes (the library only calls back): a quantize run that
calibrates shows a `calibrating` task, layer by layer, beside its write task, gone when the pass ends."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from gemmaquant.cli import progress as cli_progress

from ..reliability import TINY_G3, run_cli, write_tiny

LAYERS = 2


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress") / "tiny"
    write_tiny(d, {**TINY_G3, "num_hidden_layers": LAYERS}, seed=3)
    return d


def _table(bar) -> str:
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None).print(bar.make_tasks_table(bar.tasks))
    return buf.getvalue()


def test_display_draws_bytes_and_layers():
    bar = cli_progress.progress_display(console=Console(file=io.StringIO(), force_terminal=True))
    write = cli_progress.byte_task(bar, "writing Q6_K")
    calib = cli_progress.steps_task(bar)
    write(2_000_000, 8_000_000, "model.layers.0.mlp.up_proj.weight")
    calib(1, 3, "layer 1")
    shown = _table(bar)
    assert "writing Q6_K" in shown and "2.0/8.0 MB" in shown and "up_proj" in shown
    assert "calibrating" in shown and "1/3" in shown and "layer 1" in shown
    calib(3, 3, "")
    assert "calibrating" not in _table(bar) and len(bar.tasks) == 1  # the pass ended: its task is gone


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["w4a16", "q4_k_m"])  # GPTQ; the importance matrix
def test_quantize_shows_the_calibration_pass(src, tmp_path, capsys, monkeypatch, scheme):
    seen = []
    real = cli_progress.steps_task

    def recording(bar, label="calibrating"):
        cb = real(bar, label)

        def progress(done, total, what):
            cb(done, total, what)
            seen.append((done, total, what, [(t.description, t.fields["unit"]) for t in bar.tasks]))
        return progress

    monkeypatch.setattr(cli_progress, "steps_task", recording)
    extra = ["--imatrix"] if scheme == "q4_k_m" else []
    res = run_cli(["quantize", src, "--scheme", scheme, "-o", tmp_path / ("o.gguf" if extra else "o"),
                   "--calib-samples", "2", "--calib-len", "16", *extra], capsys)
    assert res.code == 0, res.stderr
    one_pass = [(i, LAYERS, f"layer {i}") for i in range(LAYERS)] + [(LAYERS, LAYERS, "")]
    assert [(d, t, w) for d, t, w, _ in seen] == one_pass
    during = seen[0][3]
    assert ("calibrating", "steps") in during and any(u == "bytes" for _, u in during)  # beside the write task
    assert all(d != "calibrating" for d, _ in seen[-1][3])
