"""benchmarks/make_synthetic.py's Gemma 4 checkpoints have the tensors transformers' own Gemma4ForCausalLM
saves and a config.json transformers reads back unchanged (per_layer_config form), at the real sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "benchmarks" / "make_synthetic.py")
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)

CASES = [(m, n) for m in synth.GEMMA4 for n in (None, 2, 4)]


def _reference(cfg: dict):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    conf = Gemma4TextConfig.from_dict(cfg)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(conf)
    return conf, {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


@pytest.mark.parametrize("model, layers", CASES)
def test_tensors_and_config_are_what_transformers_saves(model, layers):
    cfg = synth.model_config(model, layers)
    conf, ref = _reference(cfg)
    ours = synth.tensor_shapes(cfg)
    assert len({n for n, _ in ours}) == len(ours)
    assert dict(ours) == ref
    saved = json.loads(conf.to_json_string())
    saved.pop("transformers_version")
    assert saved == {k: v for k, v in cfg.items() if k != "transformers_version"}


def test_real_sizes_and_reduced_layers():
    # bf16 bytes of the released shapes (the tied head is not stored); what does not fit a 52 GB disk
    assert round(synth.checkpoint_bytes("gemma-4-31b") / 1e9, 1) == 61.4
    assert round(synth.checkpoint_bytes("gemma-4-26b-a4b") / 1e9, 1) == 50.5
    cfg = synth.model_config("gemma-4-e4b")
    assert cfg["num_kv_shared_layers"] == 18 and len(cfg["per_layer_config"]) == 7
    two = synth.model_config("gemma-4-26b-a4b", 2)
    assert two["layer_types"] == ["sliding_attention", "full_attention"] and two["num_hidden_layers"] == 2


def test_sparse_checkpoint_reads_as_gemma4(tmp_path, demo_dir):
    from gemmaquant.formats.checkpoint import Checkpoint

    out = synth.make_checkpoint("gemma-4-26b-a4b", tmp_path / "m", layers=2, sparse=True, tokenizer_dir=demo_dir)
    ck = Checkpoint(out)
    assert ck.config.is_moe and ck.shape("model.layers.0.experts.down_proj") == (128, 2816, 704)
    assert not (out / "tokenizer.model").exists() and (out / "tokenizer.json").is_file()
