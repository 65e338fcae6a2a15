"""The built-in forward pass on Gemma 4 against transformers' Gemma4ForCausalLM /
Gemma4ForConditionalGeneration (float32, eager attention and experts), one tiny checkpoint per
feature combination, and the evaluation paths (perplexity, compare's layer replay) on them."""

from __future__ import annotations

import json

import pytest
import torch

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.formats.config import config_from_dict
from gemmaquant.errors import GemmaQuantError
from gemmaquant.model.loading import load_layer, load_model

from tests.tiny_gemma4 import ALL, MEDIA_IDS, VOCAB, make_tiny_gemma4, reference_logits

pytest.importorskip("transformers")

SEQ = 24  # three sliding windows (8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _ids(n: int, seed: int) -> torch.Tensor:
    """Random text ids; the media placeholders are left out (the wrapper swaps them for pad)."""
    ids = torch.randint(5, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return torch.where(torch.isin(ids, torch.tensor(MEDIA_IDS)), ids + 10, ids)


@pytest.fixture(scope="module", params=ALL)
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return request.param, d, make_tiny_gemma4(request.param, d)


def test_float32_logits_match_transformers(tiny):
    name, d, ref = tiny
    ids = _ids(2, 1)
    expected = reference_logits(ref, ids)
    ours = load_model(Checkpoint(d), torch.float32)(ids)
    assert ours.shape == expected.shape
    assert _rel(ours, expected) <= 1e-5, name


def test_wrapper_embeds_media_placeholders_as_pad_like_transformers(tmp_path):
    """Text that contains <|image|> / <|audio|> ids: the multimodal wrapper swaps them for pad."""
    d = tmp_path / "mm"
    ref = make_tiny_gemma4("e2b-mm", d)
    ids = _ids(1, 7)
    ids[0, 3:7] = torch.tensor(MEDIA_IDS)
    assert _rel(load_model(Checkpoint(d))(ids), reference_logits(ref, ids)) <= 1e-5
    assert Checkpoint(d).config.media_token_ids == (267, 267, 268)


def test_layer_by_layer_equals_forward(tiny):
    """Calibration and compare run layers one at a time: K/V sharing and per-layer inputs travel in
    the layer context, so the split run must equal the whole forward pass."""
    name, d, _ = tiny
    ck = Checkpoint(d)
    model = load_model(ck)
    ids = _ids(1, 4)
    full = model(ids)
    h, ctx = model.prepare(ids)
    for i in range(ck.config.num_hidden_layers):
        h = load_layer(ck, i)(h, ctx)
    assert torch.equal(model.head(h), full)


def test_config_resolves_the_released_geometry(tiny):
    name, d, ref = tiny
    cfg = Checkpoint(d).config
    tc = ref.config.get_text_config()
    assert cfg.generation == 4 and cfg.multimodal == name.endswith("-mm")
    for i in range(cfg.num_hidden_layers):
        attn = (ref.model.language_model if cfg.multimodal else ref.model).layers[i].self_attn
        assert (cfg.head_dim_of(i), cfg.kv_heads_of(i)) == (attn.head_dim, tc.per_layer_config[i].num_key_value_heads)
        assert cfg.kv_shared(i) == attn.is_kv_shared_layer
        assert cfg.has_v_proj(i) == (getattr(attn, "v_proj", None) is not None)


def test_original_flat_config_keys_read_like_per_layer_config(tiny, tmp_path):
    """Google's config.json has global_head_dim / num_global_key_value_heads instead of the
    per_layer_config transformers >= 5.15 saves; both must give the same model."""
    name, d, _ = tiny
    raw = json.loads((d / "config.json").read_text())
    text = raw.get("text_config", raw)
    plc = text.pop("per_layer_config")
    full = next(v for v in plc.values())
    text["global_head_dim"] = full["head_dim"]
    if "num_key_value_heads" in full:
        text["num_global_key_value_heads"] = full["num_key_value_heads"]
    assert config_from_dict(raw) == Checkpoint(d).config


def test_redundant_shared_layer_kv_of_google_files_is_accepted(tmp_path):
    """Google's E2B/E4B safetensors keep k_proj/v_proj/k_norm on KV-shared layers; nothing reads them."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "e2b"
    ref = make_tiny_gemma4("e2b", d)
    sd = load_file(d / "model.safetensors")
    cfg = Checkpoint(d).config
    for i in range(cfg.first_kv_shared, cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        sd[p + "k_proj.weight"] = torch.randn(cfg.kv_heads_of(i) * cfg.head_dim_of(i), cfg.hidden_size)
        sd[p + "v_proj.weight"] = torch.randn(cfg.kv_heads_of(i) * cfg.head_dim_of(i), cfg.hidden_size)
        sd[p + "k_norm.weight"] = torch.randn(cfg.head_dim_of(i))
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    ids = _ids(1, 5)
    assert _rel(load_model(Checkpoint(d))(ids), reference_logits(ref, ids)) <= 1e-5


@pytest.mark.parametrize("change,message", [
    ({"per_layer_config": {"09": {"head_dim": 32}}}, "'per_layer_config' entry '09'"),
    ({"per_layer_config": {"02": {"head_dim": 32}}}, "full_attention layers have different head_dim"),
    ({"num_kv_shared_layers": 6}, "KV-shared full_attention layers have no earlier"),
    ({"num_kv_shared_layers": 7}, "must be below num_hidden_layers"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}}, "full-layer rope_type 'yarn'"),
    ({"enable_moe_block": True, "num_experts": 4}, "missing required key 'top_k_experts'"),
    ({"use_bidirectional_attention": "all"}, "'use_bidirectional_attention' 'all'"),
])
def test_bad_gemma4_configs_are_one_line_errors(change, message):
    raw = {"model_type": "gemma4_text", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
           "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                           "sliding_attention", "sliding_attention", "full_attention"],
           "per_layer_config": {"02": {"head_dim": 32}, "06": {"head_dim": 32}}}
    if "per_layer_config" in change and "02" in change["per_layer_config"]:
        change = {"per_layer_config": {"06": {"head_dim": 64}, "02": {"head_dim": 32}}}
    with pytest.raises(GemmaQuantError, match=message.replace("(", r"\(")) as e:
        config_from_dict({**raw, **change})
    assert "\n" not in str(e.value)


def test_perplexity_equals_transformers_logits_perplexity(tiny, tmp_path):
    """`gemmaquant eval`'s library path (tokenizer.json, llama-perplexity's chunks) against the same
    chunks scored with transformers' logits."""
    from gemmaquant.evaluate.eval_model import open_for_eval
    from gemmaquant.evaluate.perplexity import perplexity

    name, d, ref = tiny
    text = tmp_path / "t.txt"
    text.write_text(" ".join("abcde"[i % 5] * (1 + i % 3) + "ba" for i in range(400)))
    ev = open_for_eval(str(d), dtype="float32")
    chunks = ev.chunks(text, 32, 2)
    ours = ev.perplexity(chunks)
    theirs = perplexity(lambda ids, first: reference_logits(ref, ids)[:, first:], chunks)
    assert ours.tokens_scored == theirs.tokens_scored == 2 * 15
    assert abs(ours.ppl - theirs.ppl) <= 1e-5 * theirs.ppl


def test_compare_layer_replay_runs_on_gemma4(tiny):
    """compare's per-layer error replays base hidden states through each layer: with K/V sharing and
    per-layer inputs, the model against itself must give zero error."""
    from gemmaquant.evaluate.drift import compute_base_ref, layer_errors

    name, d, _ = tiny
    model = load_model(Checkpoint(d))
    ref = compute_base_ref(model, _ids(2, 6), topk=8, layer_chunks=2)
    errs = layer_errors(model, ref)
    assert len(errs) == model.cfg.num_hidden_layers and max(errs) == 0.0


@pytest.fixture(scope="module")
def e2b_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2b-refusals")
    make_tiny_gemma4("e2b", d)
    return d


def test_inspect_describes_the_gemma4_geometry(e2b_dir):
    from gemmaquant.evaluate.inspect import inspect_path

    g = inspect_path(str(e2b_dir))["gemma"]
    assert (g["head_dim"], g["full_head_dim"], g["kv_heads"], g["full_kv_heads"]) == (16, 32, 1, 1)
    assert (g["per_layer_input"], g["kv_shared_layers"], g["experts"]) == (16, 4, 0)
    assert g["text_parameters"] == sum(p.numel() for p in load_model(Checkpoint(e2b_dir)).parameters())


@pytest.mark.parametrize("variant", ["dense", "e2b"])
def test_fp8_output_loads_in_transformers_as_our_dequantized_model(tmp_path, variant):
    """compressed-tensors fp8 of a dense Gemma4ForCausalLM: transformers + compressed-tensors
    (dequantize=True) holds exactly our dequantized weights, and with our activation rounding off
    both give the same logits. (With it on, the random tiny models move by 9-19 %: compare weights.)"""
    import json

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    from gemmaquant.evaluate.artifact import open_artifact
    from gemmaquant.export.compressed_tensors import write_compressed_tensors
    from gemmaquant.model.qlinear import FP8Linear
    from gemmaquant.schemes import get_scheme

    make_tiny_gemma4(variant, tmp_path / "src", dtype=torch.bfloat16)
    write_compressed_tensors(Checkpoint(tmp_path / "src"), get_scheme("fp8"), tmp_path / "out", progress=False)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert ("re:.*per_layer_model_projection$" in qc["ignore"]) == (variant == "e2b")
    art = open_artifact(str(tmp_path / "out"), torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()
    theirs = hf.state_dict()
    fp8 = {n: m for n, m in art.model.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8) == sum(len(art.config.linear_shapes(i)) for i in range(art.config.num_hidden_layers))
    for n, m in fp8.items():
        assert torch.equal(m.dequantize().float(), theirs[n + ".weight"].float()), n
        m.act = None
    ids = _ids(1, 8)
    with torch.no_grad():
        assert _rel(art.model(ids), hf(input_ids=ids, use_cache=False).logits) <= 1e-5
