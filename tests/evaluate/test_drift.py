"""Drift maths and the `compare` pipeline on tiny checkpoints.

KL is checked against torch's own `F.kl_div`; the pipeline against cases whose answer is known
(an artifact identical to its base, a quantized one, a model whose activations overflow fp16)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from gemmaquant.evaluate.drift import FP16_MAX, check_compatible, compare, compute_base_ref, topk_kl
from gemmaquant.errors import GemmaQuantError
from tests.evaluate.test_artifact import tiny_hf_dir


def _logps(v=300, s=40, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(s, v, generator=g) * 3
    art = base + noise * torch.randn(s, v, generator=g)
    return torch.log_softmax(base, -1), torch.log_softmax(art, -1)


def test_topk_kl_full_k_is_exact():
    lp, lq = _logps()
    ref = F.kl_div(lq.double(), lp.double(), log_target=True, reduction="none").sum(-1)
    v, i = lp.topk(lp.shape[-1], -1)
    assert torch.allclose(topk_kl(v, i, lq), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 8, 64])
def test_topk_kl_is_a_close_lower_bound(k):
    lp, lq = _logps(noise=0.5)
    ref = F.kl_div(lq.double(), lp.double(), log_target=True, reduction="none").sum(-1)
    v, i = lp.topk(k, -1)
    approx = topk_kl(v, i, lq)
    assert (approx <= ref + 1e-9).all()
    if k == 64:  # most of the mass in the top 64 of 300: close to exact
        assert approx.mean() > 0.7 * ref.mean()


def _open(path):
    from gemmaquant.evaluate.artifact import open_artifact

    return open_artifact(str(path), torch.float32)


def _chunks(n=3, ctx=32, seed=0):
    ids = torch.randint(4, 512, (n, ctx), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2
    return ids


def test_identical_artifact_has_no_drift(tmp_path):
    tiny_hf_dir(tmp_path / "src")
    base = _open(tmp_path / "src")
    ref = compute_base_ref(base.model, _chunks(), topk=16, layer_chunks=2)
    d = compare(_open(tmp_path / "src").model, ref)
    assert d.top1 == 1.0 and d.kl_mean == pytest.approx(0, abs=1e-9) and d.delta_ppl_pct == pytest.approx(0, abs=1e-9)
    assert d.layer_rel_error == [0.0] * 3
    assert d.tokens == 3 * (32 - 1 - 16)


def test_quantized_artifact_drifts_a_little(tmp_path):
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.compressed_tensors import write_compressed_tensors
    from gemmaquant.schemes import get_scheme

    tiny_hf_dir(tmp_path / "src")
    write_compressed_tensors(Checkpoint(tmp_path / "src"), get_scheme("w4a16"), tmp_path / "q", progress=False)
    ref = compute_base_ref(_open(tmp_path / "src").model, _chunks(), topk=32, layer_chunks=1)
    d = compare(_open(tmp_path / "q").model, ref)
    assert 0 < d.kl_mean < 1 and d.kl_p99 >= d.kl_mean and 0.3 < d.top1 < 1.0
    assert all(0.01 < e < 0.5 for e in d.layer_rel_error)  # INT4 g128: ~10-20% weight error


def test_fp16_overflow_is_flagged(tmp_path):
    tiny_hf_dir(tmp_path / "src")
    base = _open(tmp_path / "src")
    with torch.no_grad():  # huge embedding rows: the residual stream passes fp16's range
        base.model.model.embed_tokens.weight.mul_(3e4)
    d = compare(base.model, compute_base_ref(base.model, _chunks(1), topk=4, layer_chunks=0))
    assert d.fp16_overflow_layers == [0, 1, 2] and min(d.act_max) > FP16_MAX
    assert d.layer_rel_error == []


def test_other_model_is_refused(tmp_path):
    tiny_hf_dir(tmp_path / "a")
    from tests.tiny import TINY

    TINY["ct-gemma3-wide"] = (TINY["ct-gemma3"][0], TINY["ct-gemma3"][1],
                              {**TINY["ct-gemma3"][2], "intermediate_size": 384})
    tiny_hf_dir(tmp_path / "b", "ct-gemma3-wide")
    with pytest.raises(GemmaQuantError, match="not a quantization of .*intermediate_size 384 vs 256"):
        check_compatible(_open(tmp_path / "a").config, _open(tmp_path / "b").config, "a", "b")


def test_compare_report_and_cache(tmp_path, monkeypatch):
    from gemmaquant.cli import compare as compare_cli
    from gemmaquant.evaluate.compare import compare_artifacts
    from gemmaquant.evaluate import drift
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.compressed_tensors import write_compressed_tensors
    from gemmaquant.schemes import get_scheme

    monkeypatch.setenv("GEMMAQUANT_CACHE", str(tmp_path / "cache"))
    tiny_hf_dir(tmp_path / "src")
    write_compressed_tensors(Checkpoint(tmp_path / "src"), get_scheme("fp8"), tmp_path / "fp8", progress=False)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"p{i % 250 + 260}" for i in range(400)))
    rep = compare_artifacts(str(tmp_path / "src"), [str(tmp_path / "fp8")], text, ctx=64, chunks=3)
    a = rep["artifacts"][0]
    assert rep["text"] == str(text) and rep["text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert rep["chunks"] == 3 and a["tokens"] == 3 * 31 and a["tokenizer_match"]
    assert a["formats"] == {"FP8 W8A8 (dynamic)": 21} and 8 < a["bpw_linear"] < 8.6
    assert a["ppl"] > 0 and 0 < a["kl_mean"] < 0.1
    assert list((tmp_path / "cache" / "drift").glob("base-*.pt"))
    monkeypatch.setattr(drift, "compute_base_ref", lambda *a, **k: pytest.fail("cache not used"))
    again = compare_artifacts(str(tmp_path / "src"), [str(tmp_path / "fp8")], text, ctx=64, chunks=3)
    assert again["artifacts"][0]["kl_mean"] == a["kl_mean"] and again["base"]["ppl"] == rep["base"]["ppl"]
    md = compare_cli.markdown(rep)
    assert "| fp8 |" in md and "Δppl" in md
    json.dumps(rep)
    pytest.importorskip("matplotlib")
    compare_cli.plot(rep, tmp_path / "drift.png")
    from matplotlib import image

    png = image.imread(tmp_path / "drift.png")  # a real PNG: 12 x 4.5 in at 120 dpi
    assert png.shape[:2] == (540, 1440) and png[..., :3].std() > 0.01
