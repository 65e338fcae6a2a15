"""Every llama-quantize preset: our per-tensor plan against llama-quantize's own choice (its dry run,
through libllama), its preset list, and its imatrix refusals; the refusals and names users see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gemmaquant.formats.config import config_from_dict
from gemmaquant.errors import GemmaQuantError
from gemmaquant.export.gguf import plan_types
from gemmaquant.export.gguf.preset_rules import CATEGORIES, RULES
from gemmaquant.schemes import GGUF_NEEDS_IMATRIX, SCHEMES, UNSUPPORTED_GGUF, get_scheme

from . import llamacpp_ref as ref
from .test_plan import DEMO_LIKE, GEMMA1_LIKE, GEMMA2_LIKE

GGUF = [s.name for s in SCHEMES.values() if s.is_gguf]
# 256-wide rows (no fallback), n_head/n_kv = 4 and 16 layers: the gqa4 rules, n/8, n/16, the middle
# layers and use_more_bits all pick real tensors; the untied twin carries lm_head (token_embd rules).
GEMMA3_256 = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=ref.TINY_VOCAB,
                  hidden_size=256, intermediate_size=512, num_hidden_layers=16, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=64, sliding_window=64, rope_theta=1e6,
                  rope_local_base_freq=1e4, max_position_embeddings=32768, bos_token_id=2, eos_token_id=1,
                  pad_token_id=0)
MODELS = {"demo-like": (DEMO_LIKE, False), "gemma1-256": (GEMMA1_LIKE, False), "gemma2-512": (GEMMA2_LIKE, False),
          "gemma3-256-gqa4": (GEMMA3_256, False), "gemma3-256-untied": (GEMMA3_256, True)}


def _checkpoint(root: Path, name: str, cfg: dict, lm_head: bool) -> Path:
    """Constant-weight checkpoint: llama-quantize's type choice depends on names and shapes only."""
    from safetensors.torch import save_file

    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": not lm_head}))
    config = config_from_dict(cfg)
    shapes = dict(config.expected_shapes())
    if lm_head:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    save_file({k: torch.full(s, 0.01, dtype=torch.bfloat16) for k, s in shapes.items()}, d / "model.safetensors")
    ref.tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """model -> (config, has_lm_head, bf16 GGUF = llama-quantize's input; our bf16 writer equals the converter)."""
    pytest.importorskip("llama_cpp")
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.gguf.writer import write_gguf

    root = tmp_path_factory.mktemp("rules")
    out = {}
    for name, (cfg, lm_head) in MODELS.items():
        ck = Checkpoint(_checkpoint(root, name, cfg, lm_head))
        assert ("lm_head.weight" in ck.names()) == lm_head
        out[name] = (ck.config, lm_head, write_gguf(ck, "bf16", root / f"{name}.bf16.gguf").path)
    return out


def _compare(config, lm_head: bool, src: Path, preset: str, imatrix: bool) -> None:
    want = ref.dry_run(src, get_scheme(preset).ftype, imatrix=imatrix)
    if want["needs_imatrix"] and not imatrix:  # llama-quantize would refuse (its dry run only warns)
        with pytest.raises(GemmaQuantError, match=f"GGUF preset {preset}: this quantization requires an imatrix"):
            plan_types(config, preset, has_imatrix=False, has_lm_head=lm_head)
        return
    plans = plan_types(config, preset, has_imatrix=imatrix, has_lm_head=lm_head)
    got = {p.name: p.type.name for p in plans}
    assert list(got) == list(want["types"])  # the file's tensor order too
    assert got == want["types"]
    assert sum(p.fallback for p in plans) == want["fallback"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("preset", GGUF)
def test_plan_equals_llama_quantize_dry_run(inputs, model, preset):
    """Every tensor's type, with and without an imatrix, and the imatrix refusal, as llama-quantize."""
    config, lm_head, src = inputs[model]
    for imatrix in (False, True):
        _compare(config, lm_head, src, preset, imatrix)


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory):
    """Tiny random Gemma 1/2/3 saved by transformers, and convert_hf_to_gguf.py's bf16 of each (cached;
    test_writer.py converts the same checkpoints)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    kinds = ("gemma1", "gemma2-256", "gemma3")
    dirs = [ref.tiny_checkpoint(kind, root / f"tiny-{kind}-1M") for kind in kinds]
    return dict(zip(kinds, zip(dirs, ref.convert_many([(d, "bf16") for d in dirs]))))


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["gemma1", "gemma2-256", "gemma3"])
def test_plan_equals_llama_quantize_on_checkpoints_saved_by_transformers(saved_by_transformers, kind):
    from gemmaquant.formats.checkpoint import Checkpoint

    d, src = saved_by_transformers[kind]
    config = Checkpoint(d).config
    for preset in GGUF:
        for imatrix in (False, True):
            _compare(config, False, src, preset, imatrix)


@pytest.fixture(scope="module")
def demo_bf16(demo_dir, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.gguf.writer import write_gguf

    ck = Checkpoint(demo_dir)
    return ck.config, write_gguf(ck, "bf16", tmp_path_factory.mktemp("demo") / "demo.bf16.gguf").path


@pytest.mark.demo
@pytest.mark.llamacpp
def test_demo_plan_equals_llama_quantize_for_every_preset(demo_bf16):
    config, src = demo_bf16
    for preset in GGUF:
        for imatrix in (False, True):
            _compare(config, False, src, preset, imatrix)


@pytest.mark.llamacpp
def test_presets_are_llama_quantizes_list():
    """Every name llama-quantize accepts is a scheme with its ftype, or refused with a reason."""
    opts = ref.quant_options()
    assert len(opts) >= 39
    for name, ftype in opts:
        key = name.lower()
        if key in UNSUPPORTED_GGUF:
            with pytest.raises(GemmaQuantError, match="not supported: use llama-quantize"):
                get_scheme(name)
            continue
        s = get_scheme(name)
        assert s.is_gguf and s.ftype == ftype, name
    ours = {s.name for s in SCHEMES.values() if s.is_gguf} | set(UNSUPPORTED_GGUF)
    assert ours == {n.lower() for n, _ in opts} - {"q3_k", "q4_k", "q5_k"}  # the three aliases


# -- fast: the table itself and the messages ---------------------------------------------------------
def test_every_gguf_preset_has_a_rule_row():
    assert set(RULES) == {s.name for s in SCHEMES.values() if s.is_gguf and s.default_type not in ("BF16", "F16")}
    assert all(set(row) <= set(CATEGORIES) for row in RULES.values())


@pytest.mark.parametrize("name", ["Q3_K", "q4_k", "q5-k"])
def test_llama_quantize_aliases(name):
    assert get_scheme(name).name == {"3": "q3_k_m", "4": "q4_k_m", "5": "q5_k_m"}[name[1]]


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_GGUF))
def test_left_out_presets_say_why_in_one_line(name):
    with pytest.raises(GemmaQuantError) as e:
        get_scheme(name.upper())
    msg = str(e.value)
    assert "\n" not in msg and f"'{name.upper()}' is not supported: use llama-quantize (" in msg


@pytest.mark.parametrize("preset", sorted(GGUF_NEEDS_IMATRIX))
def test_very_low_bit_presets_refuse_without_imatrix(preset):
    cfg = config_from_dict(GEMMA3_256)
    with pytest.raises(GemmaQuantError, match=f"^GGUF preset {preset}: this quantization requires an imatrix "
                                              r"\('blk\.0\.\w+\.weight' would be \w+\); give --imatrix"):
        plan_types(cfg, preset, has_imatrix=False)
    assert plan_types(cfg, preset, has_imatrix=True)


def test_iq3_xxs_needs_an_imatrix_only_where_its_rows_do_not_fall_back():
    """On 640-wide rows (Gemma 3 270M) every IQ3_XXS / IQ2_S tensor falls back to IQ4_NL (dry runs agree)."""
    assert plan_types(config_from_dict(DEMO_LIKE), "iq3_xxs", has_imatrix=False)
    with pytest.raises(GemmaQuantError, match="iq3_xxs: this quantization requires an imatrix"):
        plan_types(config_from_dict(GEMMA3_256), "iq3_xxs", has_imatrix=False)


def test_reasons_name_the_rule():
    p = {p.name: p for p in plan_types(config_from_dict(GEMMA3_256), "q3_k_m", has_imatrix=False)}
    assert p["blk.0.ffn_down.weight"].reason == "ffn_down 0/16: i<n/16 -> Q5_K"
    assert p["blk.1.ffn_down.weight"].reason == "ffn_down: preset rule -> Q4_K"
    assert p["blk.2.attn_v.weight"].reason == "attn_v: preset rule -> Q4_K"


@pytest.mark.demo
def test_registry_bits_per_weight_are_the_demo_files(demo_dir):
    """`gemmaquant schemes` / the README quote each preset's bits per weight on the demo: the header we
    write plus every planned tensor padded to 32 bytes (benchmarks/bench_gguf_presets.py checks that this
    equals the written file's size). Header lengths do not depend on the preset, only on the imatrix keys."""
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.numerics.ggml.types import row_bytes
    from gemmaquant.export.gguf.header import ALIGNMENT, header_bytes
    from gemmaquant.schemes import DEMO_BPW

    ck = Checkpoint(demo_dir)
    meta = {"file": "demo.imatrix.gguf", "dataset": "gemmaquant-default-calibration", "entries_count": 126,
            "chunks_count": 16}
    head = {im: len(header_bytes(ck.path, ck.config, get_scheme("q8_0"), plan_types(ck.config, "q8_0", im),
                                 meta if im else None)[0]) for im in (False, True)}
    assert set(DEMO_BPW) == set(GGUF)
    for preset in GGUF:
        im = preset in GGUF_NEEDS_IMATRIX
        plans = plan_types(ck.config, preset, has_imatrix=im)
        data = [p.numel // p.n_per_row * row_bytes(p.type, p.n_per_row) for p in plans]
        size = head[im] + sum(n + (-n % ALIGNMENT) for n in data)
        assert abs(8 * size / sum(p.numel for p in plans) - DEMO_BPW[preset]) < 6e-4, preset
