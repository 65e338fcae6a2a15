"""Layer-by-layer statistics against hooks on the whole model; imatrix against a direct Σx²; data."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.calib import calibrate
from gemmaquant.calib.data import calibration_batches
from gemmaquant.numerics.ct.grid import rtn
from gemmaquant.calib.runner import run_layers
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.errors import GemmaQuantError
from gemmaquant.model.loading import load_model

from ..tiny import make_tiny

pytest.importorskip("transformers")

SEQ = 16


def _whole_model_inputs(model, ids) -> dict[str, torch.Tensor]:
    """Every Linear's input [tokens, in] (float64) from one ordinary forward of the whole model."""
    seen: dict[str, list] = {}
    hooks = [m.register_forward_pre_hook(
        lambda _m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("g2")
    make_tiny("gemma2", d)
    return Checkpoint(d)


def test_float_stats_equal_whole_model_hooks(tiny):
    ids = torch.randint(0, 256, (5, SEQ), generator=torch.Generator().manual_seed(0))
    got = {}
    run_layers(tiny, ids, kinds={"absmax", "abs_sum", "sum_sq", "xtx"}, sequential=False, batch_size=2,
               on_layer=lambda i, layer, st: got.update(st))
    ref = _whole_model_inputs(load_model(tiny), ids)
    assert set(got) == set(ref)  # every Linear of every layer
    for n, x in ref.items():
        st = got[n]
        assert st.count == x.shape[0] == 5 * SEQ
        torch.testing.assert_close(st.absmax.double(), x.abs().amax(0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(st.abs_sum, x.abs().sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.sum_sq, x.pow(2).sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.xtx.double(), x.T @ x, rtol=1e-4, atol=1e-4 * x.pow(2).sum(0).max().item())


def test_sequential_feeds_quantized_outputs(tiny):
    """With sequential=True, layer i+1 sees the outputs of the modified layers 0..i."""
    ids = torch.randint(0, 256, (3, SEQ), generator=torch.Generator().manual_seed(1))
    got, new_weights = {}, {}

    def on_layer(i, layer, st):
        got.update({n: s.sum_sq.clone() for n, s in st.items()})
        for n, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(rtn(m.weight, 4, 32, True).dequantize())
                new_weights[f"model.layers.{i}.{n}.weight"] = m.weight.clone()

    run_layers(tiny, ids, kinds={"sum_sq"}, on_layer=on_layer, sequential=True)
    model = load_model(tiny)
    float_ref = _whole_model_inputs(model, ids)
    model.load_state_dict(new_weights, strict=False)
    quant_ref = _whole_model_inputs(model, ids)
    last = f"model.layers.{tiny.config.num_hidden_layers - 1}.self_attn.q_proj"
    torch.testing.assert_close(got[last], quant_ref[last].pow(2).sum(0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[last], float_ref[last].pow(2).sum(0), rtol=1e-3)
    # layer 0 reads the embeddings either way
    first = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(got[first], float_ref[first].pow(2).sum(0), rtol=1e-5, atol=1e-6)


def test_imatrix_is_sum_of_squares_of_float_inputs(tiny):
    ids = torch.randint(0, 256, (4, SEQ), generator=torch.Generator().manual_seed(2))
    res = calibrate(tiny, "q4_k_m", imatrix=True, ids=ids)
    ref = _whole_model_inputs(load_model(tiny), ids)
    assert set(res.imatrix) == set(ref)
    for n, x in ref.items():
        sum_sq, count = res.imatrix[n]
        assert count == 4 * SEQ and sum_sq.dtype == torch.float32
        torch.testing.assert_close(sum_sq.double(), x.pow(2).sum(0), rtol=1e-5, atol=1e-6)
    assert not res.quantized and not res.overrides


def test_fp8_static_input_scale_is_absmax_over_448(tiny):
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    res = calibrate(tiny, "fp8-static", ids=ids)
    ref = _whole_model_inputs(load_model(tiny), ids)
    for n, x in ref.items():
        assert res.input_scales[n] == pytest.approx(x.abs().max().item() / 448, rel=1e-6)


def test_algorithm_validation(tiny):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(GemmaQuantError, match="allowed"):
        calibrate(tiny, "w4a16", algorithm="smoothquant", ids=ids)
    with pytest.raises(GemmaQuantError, match="GGUF"):
        calibrate(tiny, "int8", imatrix=True, ids=ids)
    assert "nothing to calibrate" in calibrate(tiny, "int8", algorithm="rtn", ids=ids).notes


class _ByteTokenizer:
    """Stand-in tokenizer: one id per UTF-8 byte (the windowing logic is what is tested here)."""

    bos_id = 2

    def encode(self, text, add_bos=False):
        return ([2] if add_bos else []) + [b + 10 for b in text.encode("utf-8")]


def test_batches_start_with_bos_and_cover_the_text(tmp_path):
    p = tmp_path / "c.txt"
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(200))
    p.write_text(text, encoding="utf-8")
    notes = []
    b = calibration_batches(_ByteTokenizer(), p, n_samples=8, seq_len=65, seed=3, notes=notes)
    assert b.shape == (8, 65) and b.dtype == torch.long
    assert torch.all(b[:, 0] == 2)
    stream = bytes(t - 10 for t in _ByteTokenizer().encode(text))
    for row in b[:, 1:]:  # each window is a real span of the text
        assert bytes((row - 10).tolist()) in stream
    assert len({tuple(r.tolist()) for r in b}) == 8 and not notes
    assert torch.equal(b, calibration_batches(_ByteTokenizer(), p, 8, 65, seed=3))
    assert not torch.equal(b, calibration_batches(_ByteTokenizer(), p, 8, 65, seed=4))


def test_short_text_is_reused_with_a_note_or_refused(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("x" * 100, encoding="utf-8")
    notes = []
    b = calibration_batches(_ByteTokenizer(), p, n_samples=10, seq_len=51, notes=notes)
    assert b.shape == (10, 51) and notes and "reuse" in notes[0]
    with pytest.raises(GemmaQuantError, match="short.txt.*100 tokens"):
        calibration_batches(_ByteTokenizer(), p, n_samples=1, seq_len=512)


@pytest.mark.parametrize("content,msg", [(b"", "empty"), (b"  \n", "empty"), (b"abc\x00def", "binary"),
                                         (b"caf\xe9 au lait", "not UTF-8")])
def test_bad_files_name_the_file(tmp_path, content, msg):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(GemmaQuantError, match=f"bad.txt.*{msg}"):
        calibration_batches(_ByteTokenizer(), p)


def test_default_text_is_packaged_and_varied():
    from gemmaquant.calib.data import default_text

    t = default_text()
    assert 250_000 <= len(t.encode("utf-8")) <= 320_000
    for marker in ("<start_of_turn>user\n", "<end_of_turn>", "def ", "#include", "function ", "Où",
                   "Bahnhof", "书店", "散歩", "मेला", "Зимний", "| Month |", "fn main", "SELECT ", "apiVersion:",
                   "Jambo", "한국어", "الطقس"):
        assert marker in t, marker
    b = calibration_batches(_ByteTokenizer(), None, n_samples=4, seq_len=128)
    assert b.shape == (4, 128)


def test_default_calibration_windows_do_not_overlap(demo_dir):
    """The CLI's default, 128 windows of 512 tokens, is distinct text: GPTQ over a text repeated in
    overlapping windows fits that text's quirks (RESULTS.md §11, eighth round)."""
    from gemmaquant.calib.data import load_tokenizer_for

    notes: list[str] = []
    b = calibration_batches(load_tokenizer_for(demo_dir), None, n_samples=128, seq_len=512, notes=notes)
    assert b.shape == (128, 512) and not notes
    assert len({tuple(r) for r in b[:, 1:].tolist()}) == 128


def test_float_target_pairs_float_and_quantized_inputs(tiny):
    """xfx = Fᵀ X: F from the float model, X from the model whose earlier layers are quantized."""
    ids = torch.randint(0, 256, (3, SEQ), generator=torch.Generator().manual_seed(4))
    got, new_weights = {}, {}

    def on_layer(i, layer, st):
        got.update({n: (s.xfx.clone(), s.xtx.clone()) for n, s in st.items()})
        for n, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(rtn(m.weight, 4, 32, True).dequantize())
                new_weights[f"model.layers.{i}.{n}.weight"] = m.weight.clone()

    run_layers(tiny, ids, kinds={"xtx", "xfx"}, on_layer=on_layer, sequential=True, float_target=True,
               batch_size=2)
    model = load_model(tiny)
    F = _whole_model_inputs(model, ids)
    model.load_state_dict(new_weights, strict=False)
    X = _whole_model_inputs(model, ids)
    for i in range(tiny.config.num_hidden_layers):  # a layer's first Linear reads only earlier layers' output
        n = f"model.layers.{i}.self_attn.q_proj"
        xfx, xtx = got[n]
        tol = 1e-4 * X[n].pow(2).sum(0).max().item()
        torch.testing.assert_close(xfx.double(), F[n].T @ X[n], rtol=1e-4, atol=tol)
        torch.testing.assert_close(xtx.double(), X[n].T @ X[n], rtol=1e-4, atol=tol)
    last = f"model.layers.{tiny.config.num_hidden_layers - 1}.self_attn.q_proj"
    assert not torch.allclose(F[last], X[last], rtol=1e-3)  # the two streams really differ


@pytest.mark.parametrize("mode", [dict(sequential=False), dict(sequential=True),
                                  dict(sequential=True, float_target=True)], ids=["float", "sequential", "paired"])
def test_a_layer_and_its_statistics_are_freed_before_the_next_loads(tiny, monkeypatch, mode):
    """Only ONE decoder layer is resident: by the time layer i+1 loads, layer i's float32 weights and its
    statistics are gone by reference counting alone (Python's gc disabled). A reference cycle through a
    Linear kept each float32 layer until gc ran: 1.8 GiB beside the next layer on the 31B shapes (RESULTS.md
    §11, fifteenth round)."""
    import gc
    import weakref

    from gemmaquant.calib import runner

    alive: list[weakref.ref] = []

    def load_layer(*a, **k):
        assert [r for r in alive if r() is not None] == [], "an earlier layer or its statistics still resident"
        layer = real(*a, **k)
        alive.extend(weakref.ref(p) for p in layer.parameters())
        alive.append(weakref.ref(layer))
        return layer

    def on_layer(i, layer, stats):
        alive.extend(weakref.ref(st.xtx) for st in stats.values())

    real = runner.load_layer
    monkeypatch.setattr(runner, "load_layer", load_layer)
    ids = torch.randint(0, 256, (3, SEQ), generator=torch.Generator().manual_seed(0))
    kinds = {"xtx", "xfx"} if mode.get("float_target") else {"xtx"}
    gc.disable()
    try:
        run_layers(tiny, ids, kinds=kinds, on_layer=on_layer, batch_size=2, **mode)
        assert len(alive) > 2 * tiny.config.num_hidden_layers
        assert [r for r in alive if r() is not None] == []
    finally:
        gc.enable()
