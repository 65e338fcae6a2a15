"""The built-in forward pass against transformers' Gemma implementations (the reference)."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.model.loading import load_layer, load_model

from ..tiny import TINY, make_tiny

pytest.importorskip("transformers")

SEQ = 24  # longer than every tiny sliding window (6 or 8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    ref = make_tiny(request.param, d)
    return request.param, d, ref


def test_float32_logits_match_transformers(tiny):
    name, d, ref = tiny
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    ours = load_model(Checkpoint(d), torch.float32)(ids)
    assert ours.shape == expected.shape
    assert _rel(ours, expected) <= 1e-5, name


def test_bfloat16_logits_match_transformers(tiny):
    name, d, ref = tiny
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(2))
    ref_bf16 = ref.to(torch.bfloat16)
    try:
        with torch.no_grad():
            expected = ref_bf16(ids).logits
    finally:
        ref.to(torch.float32)
    ours = load_model(Checkpoint(d), torch.bfloat16)(ids)
    assert ours.dtype == torch.bfloat16
    # same op order in bf16: differences come only from kernel accumulation order
    assert _rel(ours, expected) <= 2e-2, name


def test_sliding_window_matters(tmp_path):
    """A sequence longer than the window must differ from a model with the window removed."""
    d = tmp_path / "g2"
    make_tiny("gemma2", d)
    ck = Checkpoint(d)
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(3))
    m = load_model(ck)
    a = m(ids)
    object.__setattr__(m.cfg, "sliding_window", 10_000)
    b = m(ids)
    assert torch.equal(a[:, :8], b[:, :8])  # inside the window: identical
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_layer_by_layer_equals_forward_and_every_linear_is_observable(tiny):
    name, d, _ = tiny
    ck = Checkpoint(d)
    model = load_model(ck)
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(4))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.append((n, args[0].shape)))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    full = model(ids)
    for h in hooks:
        h.remove()
    assert len(seen) == 7 * ck.config.num_hidden_layers
    assert all(n.startswith("model.layers.") for n, _ in seen)

    h = model.embed(ids)
    ctx = model.layer_context(SEQ)
    for i in range(ck.config.num_hidden_layers):
        h = load_layer(ck, i)(h, ctx)  # one layer resident at a time
    assert torch.equal(model.head(h), full)


def test_embedding_scale_is_rounded_to_compute_dtype(tmp_path):
    d = tmp_path / "g3"
    make_tiny("gemma3", d)
    m = load_model(Checkpoint(d), torch.bfloat16)
    ids = torch.tensor([[5]])
    raw = m.model.embed_tokens.weight[5]
    # sqrt(64) = 8 is exact; check the multiplier is the bf16-rounded tensor, like transformers
    assert torch.equal(m.embed(ids)[0, 0], raw * torch.tensor(8.0, dtype=torch.bfloat16))


def test_untied_lm_head_is_the_head(tmp_path):
    """A checkpoint with its own lm_head.weight: the logits come from it, not from the embedding."""
    ref = make_tiny("gemma3-untied", tmp_path)
    ck = Checkpoint(tmp_path)
    assert "lm_head.weight" in ck.names()
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref(ids).logits
    ours = load_model(ck)
    assert _rel(ours(ids), expected) <= 1e-5
    with torch.no_grad():
        tied = torch.nn.functional.linear(ours.model.norm(torch.zeros(1, 64) + 1), ours.model.embed_tokens.weight)
        untied = ours.head(torch.zeros(1, 64) + 1)
    assert not torch.allclose(tied, untied)
