"""plan_types against llama-quantize's real choices (types read back from libllama's output files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmaquant.formats.config import config_from_dict
from gemmaquant.errors import GemmaQuantError
from gemmaquant.export.gguf import fallback_count, plan_types, use_more_bits
from gemmaquant.schemes import get_scheme

from . import llamacpp_ref as ref

PRESETS = ["q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q4_0", "f16", "bf16"]

# Gemma 3 270M's tensor geometry that matters to llama-quantize (row lengths 640/1024/2048, 18 layers,
# tied embeddings), shrunk where it does not: FFN 256 rows, a 320-token vocabulary.
DEMO_LIKE = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=ref.TINY_VOCAB,
                 hidden_size=640, intermediate_size=256, num_hidden_layers=18, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=64, sliding_window=512, rope_theta=1e6,
                 rope_local_base_freq=1e4, max_position_embeddings=32768, bos_token_id=2, eos_token_id=1,
                 pad_token_id=0)
GEMMA1_LIKE = dict(architectures=["GemmaForCausalLM"], model_type="gemma", vocab_size=ref.TINY_VOCAB,
                   hidden_size=256, intermediate_size=512, num_hidden_layers=10, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=128, bos_token_id=2, eos_token_id=1, pad_token_id=0)
GEMMA2_LIKE = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=ref.TINY_VOCAB,
                   hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=256, sliding_window=64, bos_token_id=2, eos_token_id=1,
                   pad_token_id=0)


def _checkpoint(root: Path, name: str, cfg: dict) -> Path:
    """Zero-weight checkpoint: llama-quantize's type choice depends on names and shapes only."""
    from safetensors.torch import save_file

    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    shapes = config_from_dict(cfg).expected_shapes()
    save_file({k: torch.full(s, 0.01, dtype=torch.bfloat16) for k, s in shapes.items()}, d / "model.safetensors")
    ref.tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def bf16_inputs(tmp_path_factory):
    """name -> (config, bf16 GGUF) used as llama-quantize input."""
    pytest.importorskip("llama_cpp")
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.gguf.writer import write_gguf

    root = tmp_path_factory.mktemp("plan")
    out = {}
    for name, cfg in (("demo-like", DEMO_LIKE), ("gemma1-256", GEMMA1_LIKE), ("gemma2-512", GEMMA2_LIKE)):
        ck = Checkpoint(_checkpoint(root, name, cfg))
        out[name] = (ck.config, write_gguf(ck, "bf16", root / f"{name}.bf16.gguf").path)
    return out


def _imatrix_for(config) -> dict[str, np.ndarray]:
    from gemmaquant.export.gguf.plan import hf_tensors
    from gemmaquant.formats.gguf.names import gguf_name

    return {gguf_name(hf, config.generation): np.ones(shape[-1], dtype=np.float32)
            for hf, shape in hf_tensors(config).items() if len(shape) == 2 and "embed" not in hf}


@pytest.mark.llamacpp
@pytest.mark.parametrize("model", ["demo-like", "gemma1-256", "gemma2-512"])
@pytest.mark.parametrize("preset", PRESETS)
def test_plan_equals_llama_quantize(bf16_inputs, tmp_path, model, preset):
    config, src = bf16_inputs[model]
    out = ref.quantize(src, tmp_path / "q.gguf", get_scheme(preset).ftype)
    want = ref.tensor_types(out)
    got = {p.name: p.type.name for p in plan_types(config, preset, has_imatrix=False)}
    assert list(got) == list(want)  # same tensor order too
    assert got == want


@pytest.mark.llamacpp
@pytest.mark.parametrize("preset", ["q4_0", "q4_k_m"])
def test_plan_with_imatrix_equals_llama_quantize(bf16_inputs, tmp_path, preset):
    config, src = bf16_inputs["demo-like"]
    out = ref.quantize(src, tmp_path / "q.gguf", get_scheme(preset).ftype, imatrix=_imatrix_for(config),
                       meta={"file": "x.dat"})
    got = {p.name: p.type.name for p in plan_types(config, preset, has_imatrix=True)}
    assert got == ref.tensor_types(out)
    if preset == "q4_0":  # the first n/8 = 2 ffn_down go to Q4_1 only with an imatrix
        assert [got[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["Q4_1", "Q4_1", "Q4_0"]


def test_plan_matches_the_anchor_q4_k_m(demo_gguf):
    """The published Gemma 3 270M Q4_K_M (made by llama-quantize) has exactly our types. Its types are
    read by our header-only reader, which test_inspect.py checks against llama.cpp's own parser on this
    very file (gguf.GGUFReader would spend ~30 s building objects for the 262k-entry vocabulary)."""
    from gemmaquant.formats.gguf.reader import read_gguf_header

    want = {t.name: t.type_name for t in read_gguf_header(demo_gguf).tensors}
    assert len(want) == 236
    cfg = config_from_dict(dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640,
                                intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=256, sliding_window=512))
    plans = plan_types(cfg, "q4_k_m", has_imatrix=False)
    assert {p.name: p.type.name for p in plans} == want
    assert fallback_count(plans) == 90  # llama-quantize: "90 of 236 tensor(s) required fallback"


def test_use_more_bits_for_18_layers():
    assert [i for i in range(18) if use_more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]


def test_reasons_name_the_fallback():
    cfg = config_from_dict(DEMO_LIKE)
    p = {p.name: p for p in plan_types(cfg, "q4_k_m", has_imatrix=False)}
    assert p["blk.0.attn_q.weight"].reason.endswith("fallback: 640 % 256 ≠ 0 -> Q5_0")
    assert p["blk.0.attn_q.weight"].fallback
    assert not p["token_embd.weight"].fallback  # demoted by the output rule, not counted


def test_unknown_preset_lists_the_allowed_ones():
    cfg = config_from_dict(DEMO_LIKE)
    with pytest.raises(GemmaQuantError, match="q4_k_m.*bf16|bf16.*q4_k_m"):
        plan_types(cfg, "q3_k_xl", has_imatrix=False)
    with pytest.raises(GemmaQuantError, match="allowed"):
        plan_types(cfg, "fp8", has_imatrix=False)
