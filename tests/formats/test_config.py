"""Config parsing: transformers 4.x and 5.x keys, multimodal Gemma 3, errors that name the key."""

from __future__ import annotations

import pytest

from gemmaquant.formats.config import FULL, SLIDING, config_from_dict
from gemmaquant.errors import GemmaQuantError

# The official gemma-3-270m config.json (transformers 4.x keys).
G3_V4 = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
    "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
    "sliding_window": 512, "_sliding_window_pattern": 6, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "max_position_embeddings": 32768,
}
# The same model as transformers 5.x writes it.
G3_V5 = {k: v for k, v in G3_V4.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                                                      "_sliding_window_pattern")}
G3_V5["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
G3_V5["layer_types"] = [SLIDING if (i + 1) % 6 else FULL for i in range(18)]


def test_v4_and_v5_keys_give_the_same_config():
    a, b = config_from_dict(G3_V4), config_from_dict(G3_V5)
    assert a == b
    assert a.rope_theta == 1e6 and a.rope_local_theta == 1e4
    assert [i for i, t in enumerate(a.layer_types) if t == FULL] == [5, 11, 17]
    assert a.qk_norm and a.sandwich_norms and a.query_pre_attn_scalar == 256


def test_gemma2_27b_query_scale_is_read_not_assumed():
    cfg = config_from_dict({
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 4608, "intermediate_size": 36864,
        "num_hidden_layers": 46, "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
        "query_pre_attn_scalar": 144, "sliding_window": 4096, "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    })
    assert cfg.query_pre_attn_scalar == 144 and cfg.head_dim == 128
    assert cfg.layer_types[:4] == (SLIDING, FULL, SLIDING, FULL)
    assert cfg.attn_logit_softcapping == 50.0 and cfg.final_logit_softcapping == 30.0


def test_gemma3_linear_rope_scaling_v4_and_v5():
    v4 = dict(G3_V4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    v5 = dict(G3_V5, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                      "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                         "rope_theta": 1000000.0}})
    assert config_from_dict(v4).rope_scaling_factor == config_from_dict(v5).rope_scaling_factor == 8.0


def test_multimodal_gemma3_reads_the_text_config():
    cfg = config_from_dict({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                            "text_config": dict(G3_V4, vocab_size=262208), "vision_config": {}})
    assert cfg.model_type == "gemma3_text" and cfg.multimodal and cfg.vocab_size == 262208


@pytest.mark.parametrize("patch, words", [
    ({"model_type": "llama"}, ["model_type 'llama'", "gemma2"]),
    ({"hidden_size": None}, ["hidden_size"]),
    ({"num_attention_heads": 3, "num_key_value_heads": 2}, ["num_attention_heads 3", "num_key_value_heads"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2}}, ["yarn", "linear"]),
    ({"layer_types": ["x"]}, ["layer_types"]),
])
def test_bad_configs_name_the_key(patch, words):
    with pytest.raises(GemmaQuantError) as e:
        config_from_dict(dict(G3_V4, **patch), where="/m/config.json")
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("model_type,arch,family", [
    ("gemma3n", "Gemma3nForConditionalGeneration", "Gemma 3n"),
    ("paligemma", "PaliGemmaForConditionalGeneration", "PaliGemma"),
    ("recurrent_gemma", "RecurrentGemmaForCausalLM", "RecurrentGemma"),
    ("t5gemma", "T5GemmaForConditionalGeneration", "T5Gemma"),
    ("gemma3_text", "Gemma3TextModel", "EmbeddingGemma"),
    ("gemma3", "Gemma3ForSequenceClassification", "head other than the causal LM"),
    ("gemma2", "Gemma2ForTokenClassification", "head other than the causal LM"),
])
def test_other_gemma_families_are_refused_by_name(tmp_path, model_type, arch, family):
    """The config.json transformers writes for each family: one line naming family and architecture."""
    transformers = pytest.importorskip("transformers")
    from gemmaquant.formats.config import load_config

    cfg = transformers.AutoConfig.for_model(model_type)
    cfg.architectures = [arch]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(GemmaQuantError) as e:
        load_config(tmp_path)
    msg = str(e.value)
    assert family in msg and arch in msg and "Gemma3ForConditionalGeneration" in msg and "\n" not in msg
