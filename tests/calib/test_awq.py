"""AWQ scale search and the whole calibrated W4A16 path on a tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gemmaquant.calib import CalibResult, calibrate
from gemmaquant.calib.awq import output_error, search_scale
from gemmaquant.numerics.ct.grid import rtn
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.model.loading import load_model
from gemmaquant.schemes import QuantArgs, get_scheme

from ..tiny import make_tiny


def _salient_inputs(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, ::16] *= 20.0  # a few channels carry most of the activation energy
    return x


def test_search_reduces_output_error_vs_rtn():
    X = _salient_inputs(2048, 256, 0)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    H = X.T @ X / X.shape[0]
    s, err, base = search_scale(W, H, X.abs().mean(0), bits=4, group_size=64, symmetric=True)
    assert base == pytest.approx(output_error(W, H, torch.ones(256), 4, 64, True))
    # the trace formula is the real output error of RTN(W·s)/s on these inputs
    Wq = rtn(W * s, 4, 64, True).dequantize() / s
    assert err == pytest.approx(((X @ (W - Wq).T) ** 2).sum().item() / X.shape[0], rel=1e-3)
    assert err < 0.8 * base
    assert s[::16].mean() > s.mean()  # salient channels are scaled up


def _kl(ref_logits, logits):
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True,
                    reduction="batchmean").item()


@pytest.mark.slow  # calibrates and quantizes whole tiny models: 5-10 s each
@pytest.mark.parametrize("name", ["gemma3", "gemma1-mqa"])
def test_calibrated_w4_beats_rtn_and_keeps_folds_exact(name, tmp_path):
    pytest.importorskip("transformers")
    make_tiny(name, tmp_path, dtype=torch.bfloat16)
    ck = Checkpoint(tmp_path)
    w4 = get_scheme("w4a16")
    scheme = dataclasses.replace(w4, weights=QuantArgs(4, "int", "group", group_size=32))  # tiny widths
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (16, 32), generator=g)
    test_ids = ids[:6]  # in-sample: what the algorithms optimise (random weights do not generalise)
    model = load_model(ck)
    ref = model(test_ids)

    def kl_of(res):
        m = load_model(ck)
        sd = {n + ".weight": q.dequantize() for n, q in res.quantized.items()}
        sd.update({n: t.float() for n, t in res.overrides.items()})
        m.load_state_dict(sd, strict=False)
        assert len(res.quantized) == 7 * ck.config.num_hidden_layers
        return _kl(ref, m(test_ids))

    rtn_res = CalibResult()  # the RTN baseline (calibrate() leaves RTN to the writers)
    for i in range(ck.config.num_hidden_layers):
        for n, mod in load_model(ck).model.layers[i].named_modules():
            if isinstance(mod, torch.nn.Linear):
                rtn_res.quantized[f"model.layers.{i}.{n}"] = rtn(mod.weight, 4, 32, True)
    kl_rtn = kl_of(rtn_res)
    awq = calibrate(ck, scheme, algorithm="awq", ids=ids, awq_grid=5)
    assert awq.overrides and all(t.dtype == torch.bfloat16 for t in awq.overrides.values())
    kl_awq = kl_of(awq)
    kl_both = kl_of(calibrate(ck, scheme, algorithm="awq+gptq", ids=ids, awq_grid=5))
    # AWQ alone optimises a per-mapping proxy (never worse than s = 1 there); end to end on random
    # weights it is about neutral, so only "not worse" is asserted for it. With GPTQ it must clearly win.
    assert kl_awq < 1.05 * kl_rtn and kl_both < 0.7 * kl_rtn, (kl_rtn, kl_awq, kl_both)
