"""SmoothQuant folding keeps the float model: our forward before/after, and transformers on the result."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.calib.fold import MAPPINGS
from gemmaquant.calib.runner import run_layers
from gemmaquant.calib.smoothquant import smooth_layer
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.model.loading import load_model

from ..tiny import make_tiny

pytest.importorskip("transformers")

SEQ = 20


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _smooth_all(ck: Checkpoint, ids, alpha, mappings=MAPPINGS):
    """Fold SmoothQuant into every layer; returns (folded state dict, {norm name: stored weight})."""
    state, norms = {}, {}

    def on_layer(i, layer, stats):
        p = f"model.layers.{i}."
        local = {k[len(p):]: v for k, v in stats.items()}
        for attr, w in smooth_layer(layer, local, alpha=alpha, mappings=mappings,
                                    stored_dtype=ck.dtype(p + "input_layernorm.weight")).items():
            norms[p + attr + ".weight"] = w
        state.update({p + k: v.clone() for k, v in layer.state_dict().items()})

    run_layers(ck, ids, kinds={"absmax"}, on_layer=on_layer, sequential=False)
    return state, norms


@pytest.mark.parametrize("name", ["gemma1-mqa", "gemma2", "gemma3"])
def test_folding_keeps_float_logits(name, tmp_path):
    ref = make_tiny(name, tmp_path, dtype=torch.bfloat16)  # bf16 storage: the norm rounding matters
    ck = Checkpoint(tmp_path)
    ids = torch.randint(0, 256, (3, SEQ), generator=torch.Generator().manual_seed(0))
    model = load_model(ck, torch.float32)
    before = model(ids)
    state, norms = _smooth_all(ck, ids, alpha=0.8)

    # the fold did something: norms and Linear columns really changed
    changed = max((state[n].float() - ck.tensor(n).float()).abs().max().item() for n in norms)
    assert changed > 0.05
    down = "model.layers.0.mlp.down_proj.weight"
    assert _rel(state[down], ck.tensor(down)) > 0.1
    # norms are stored values (bf16) and the Gemma 2/3 post-norms were never touched
    for n, w in norms.items():
        assert w.dtype == torch.bfloat16 and torch.equal(state[n], w.float()), n
    for n in state:
        if "post_feedforward_layernorm" in n or (ck.config.sandwich_norms and "post_attention_layernorm" in n):
            assert torch.equal(state[n], ck.tensor(n).float()), n

    model.load_state_dict(state, strict=False)
    after = model(ids)
    assert _rel(after, before) < 1e-5

    # transformers, with its own (1 + w) norms and GQA head layout, on the folded weights
    ref = ref.float()
    ref_before = ref(ids).logits
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected
    with torch.no_grad():
        assert _rel(ref(ids).logits, ref_before) < 1e-5


def test_alpha_balances_activation_and_weight_ranges(tmp_path):
    """After smoothing with α = 0.5, max|X_j| = max|W_:,j| for down_proj (its scale is exact, no norm)."""
    make_tiny("gemma3", tmp_path)
    ck = Checkpoint(tmp_path)
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    seen = {}

    def on_layer(i, layer, stats):
        if i:
            return
        local = {k[len("model.layers.0."):]: v for k, v in stats.items()}
        before = local["mlp.down_proj"].absmax.clone()
        smooth_layer(layer, local, alpha=0.5, mappings=("down",), stored_dtype=torch.float32)
        seen["before"] = before
        seen["layer"] = layer

    run_layers(ck, ids, kinds={"absmax"}, on_layer=on_layer, sequential=False, layers=range(1))
    layer = seen["layer"]
    acts = []
    h = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0].abs().amax((0, 1))))
    from gemmaquant.calib.runner import embed_ids
    from gemmaquant.model.gemma import make_layer_context
    with torch.no_grad():
        layer(embed_ids(ck, ids), make_layer_context(ck.config, SEQ, torch.device("cpu"), torch.float32))
    h.remove()
    x_max, w_max = acts[0], layer.mlp.down_proj.weight.abs().amax(0)
    torch.testing.assert_close(x_max, w_max, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(seen["before"], x_max, rtol=0.1)  # the activations did change


def test_rejects_bad_alpha(tmp_path):
    make_tiny("gemma2", tmp_path)
    ck = Checkpoint(tmp_path)
    with pytest.raises(ValueError, match="alpha"):
        run_layers(ck, torch.zeros(1, 4, dtype=torch.long), kinds={"absmax"}, sequential=False,
                   on_layer=lambda i, layer, st: smooth_layer(
                       layer, {k.split(".", 3)[3]: v for k, v in st.items()}, alpha=1.5))
