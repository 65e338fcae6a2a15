"""What llama.cpp computes from the converter's GGUF where a checkpoint's settings have no GGUF key
(query_pre_attn_scalar, the sliding pattern): the quantize-time notes, and the prediction checked
against llama.cpp's own logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.formats.gguf.fidelity import gguf_notes, llama_cpp_config

from tests.export.gguf import llamacpp_ref as ref

pytest.importorskip("transformers")

# transformers kwargs on top of a 6-layer tiny Gemma 3 (head_dim 32)
CASES = {
    "released": {},  # default pattern 6, qpas = head_dim: llama.cpp computes the same model
    "qpas48": dict(query_pre_attn_scalar=48),
    "pattern2": dict(sliding_window_pattern=2),
}


def _tiny(out, **kw):
    import transformers

    cfg = transformers.Gemma3TextConfig(
        vocab_size=ref.TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
        **{"query_pre_attn_scalar": 32, **kw}, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in n else 0.1))
    model.save_pretrained(out)
    ref.tiny_tokenizer(out)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_notes_name_the_key_and_the_value_llama_cpp_uses(tmp_path, case):
    _tiny(tmp_path, **CASES[case])
    notes = gguf_notes(Checkpoint(tmp_path).config, "config.json")
    if case == "released":
        assert notes == []
    elif case == "qpas48":
        assert len(notes) == 1 and "query_pre_attn_scalar is 48" in notes[0] and "1/sqrt(32)" in notes[0]
    else:
        assert len(notes) == 1 and "layer_types puts full attention at layers [1, 3, 5]" in notes[0]
        assert "gemma3.attention.sliding_window_pattern" in notes[0] and "layers [5]" in notes[0]


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_computes_the_predicted_model(tmp_path, case):
    """llama.cpp's logits on our bf16 GGUF equal our forward pass with `llama_cpp_config`, and differ
    from transformers' exactly when a note was given."""
    from gemmaquant.export.gguf.writer import write_gguf
    from gemmaquant.model.loading import load_model
    from gemmaquant.model.gemma import build_model
    from tests.llamacpp import open_llama

    hf = _tiny(tmp_path / "m", **CASES[case]).to(torch.bfloat16).float()  # the GGUF holds bf16 weights
    ck = Checkpoint(tmp_path / "m")
    path = write_gguf(ck, "bf16", tmp_path / "m.gguf").path
    ids = [2] + list(range(300, 318)) * 2
    llm = open_llama(path, n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    llm.eval(ids)
    got = torch.tensor(np.asarray(llm.scores[: len(ids)]))
    ours = load_model(ck)
    pred = build_model(llama_cpp_config(ck.config))
    pred.load_state_dict(ours.state_dict())
    t = torch.tensor([ids])
    with torch.no_grad():
        want = pred(t)[0]
        hf_logits = hf(t).logits[0]
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < 0.05  # bf16 activations in llama.cpp: 0.02 measured
    drift = float((got - hf_logits).abs().max() / scale)
    assert (drift > 0.1) == bool(gguf_notes(ck.config, "x")), drift


@pytest.mark.slow  # a GGUF written and two models run: seconds
@pytest.mark.parametrize("case", ["released", "qpas48"])
def test_compare_explains_a_gguf_delta(tmp_path, case, monkeypatch):
    """`compare` of the HF model with its GGUF names the setting llama.cpp computes differently."""
    from gemmaquant.evaluate.compare import compare_artifacts
    from gemmaquant.export.gguf.writer import write_gguf

    monkeypatch.setenv("GEMMAQUANT_CACHE", str(tmp_path / "cache"))
    _tiny(tmp_path / "m", **CASES[case])
    path = write_gguf(Checkpoint(tmp_path / "m"), "bf16", tmp_path / "m.gguf").path
    text = tmp_path / "t.txt"
    text.write_text("abc de fa bcd ea " * 40)
    rep = compare_artifacts(str(tmp_path / "m"), [str(path)], text, ctx=16, chunks=2, use_cache=False)
    notes = rep["artifacts"][0]["notes"]
    if case == "released":
        assert notes == []
    else:
        assert len(notes) == 1 and "query_pre_attn_scalar is 48" in notes[0] and str(path) in notes[0]
