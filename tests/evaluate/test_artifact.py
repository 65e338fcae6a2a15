"""Artifacts run in the built-in forward pass.

* tiny Gemma 1/2/3 GGUFs (written with the `gguf` package's GGUFWriter, Q8_0) give the logits of
  transformers running the same (reference-dequantized) weights;
* our validating GGUF reader agrees with gguf.GGUFReader;
* the real llama.cpp-made Q4_K_M demo GGUF gives llama.cpp's own logits and perplexity;
* our compressed-tensors outputs give the ppl of transformers + compressed-tensors;
* bad input: another architecture, truncated or corrupt files.
"""

from __future__ import annotations


import gguf
import numpy as np
import pytest
import torch

from gemmaquant.evaluate.artifact import open_artifact
from gemmaquant.errors import GemmaQuantError
from gemmaquant.formats.gguf.names import gguf_name
from gemmaquant.formats.gguf.reader import GGUFFile
from gemmaquant.evaluate.perplexity import chunk_nll
from tests.llamacpp import open_llama
from tests.tiny import TINY

Q8 = gguf.GGMLQuantizationType.Q8_0
TINY_GGUF = {  # llama.cpp scales queries by head_dim (not query_pre_attn_scalar) below 27B
    "gemma": ("gemma1-mha", {"vocab_size": 512}),
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 16, "vocab_size": 512}),
    "gemma3": ("gemma3", {"vocab_size": 512}),
}


def _pieces(v: int):
    """<pad> <eos> <bos> <unk>, the 256 byte pieces, then normal pieces p260, p261, ..."""
    toks = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    toks += [f"p{i}" for i in range(len(toks), v)]
    return toks, [3, 3, 3, 2] + [6] * 256 + [1] * (v - 260)


def write_tiny_gguf(path, arch: str, seed: int = 0, arch_name: str | None = None):
    """A random tiny model of `arch` as a Q8_0 GGUF; returns the transformers model holding exactly
    the GGUF's (dequantized) weights, for reference."""
    import transformers

    key, over = TINY_GGUF[arch]
    cfg_cls, model_cls, kw = TINY[key]
    cfg = getattr(transformers, cfg_cls)(**{**kw, **over}, attn_implementation="eager")
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(cfg).eval()
    gen = {"gemma": 1, "gemma2": 2, "gemma3": 3}[arch]
    a = arch_name or arch
    w = gguf.GGUFWriter(str(path), a)
    w.add_context_length(128)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma3":
        w.add_rope_freq_base(1e6)
        w.add_sliding_window(cfg.sliding_window)
        w.add_uint32(f"{a}.attention.sliding_window_pattern", 2)
    toks, types = _pieces(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * len(toks))
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name == "lm_head.weight":
                continue
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.08))
            g = gguf_name(name, gen)
            if p.ndim == 1:  # norms: stored +1 in F32; the reference gets the value we read back
                stored = (p.float() + 1.0).numpy()
                w.add_tensor(g, stored)
                p.copy_(torch.from_numpy(stored) - 1.0)
            else:
                q = gguf.quants.quantize(p.float().numpy(), Q8)
                w.add_tensor(g, q, raw_dtype=Q8)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, Q8)).reshape(p.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf.tie_weights()
    return hf


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_tiny_gguf_matches_transformers(tmp_path, arch):
    hf = write_tiny_gguf(tmp_path / "t.gguf", arch)
    art = open_artifact(str(tmp_path / "t.gguf"), torch.float32)
    assert art.kind == "gguf" and art.formats == {"Q8_0": 7 * art.config.num_hidden_layers}
    ids = torch.randint(4, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = 2
    with torch.no_grad():
        ours = art.model(ids)
        ref = hf(ids).logits
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4), (ours - ref).abs().max()
    assert 8.0 < art.bpw_linear < 9.0  # Q8_0: 34 bytes per 32 weights = 8.5 bpw


def test_reader_agrees_with_gguf_package(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", "gemma2")
    ours = GGUFFile(tmp_path / "t.gguf")
    ref = gguf.GGUFReader(tmp_path / "t.gguf")
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        i = ours.tensors[t.name]
        assert (i.offset, int(i.qtype), i.nbytes) == (t.data_offset, int(t.tensor_type), int(t.n_bytes))
        assert i.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(ours.raw(t.name).numpy().reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
    for k, f in ref.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        got = ours.metadata[k]
        assert (list(got) == list(v)) if isinstance(v, list) else got == pytest.approx(v), k


# -- bad input -----------------------------------------------------------------------------------
def test_other_architecture_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "l.gguf", "gemma3", arch_name="llama")
    with pytest.raises(GemmaQuantError, match="architecture 'llama' is not a Gemma"):
        open_artifact(str(tmp_path / "l.gguf"))


def test_truncated_gguf_names_tensor_and_offset(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", "gemma3")
    data = (tmp_path / "t.gguf").read_bytes()
    last = max(GGUFFile(tmp_path / "t.gguf").tensors.values(), key=lambda t: t.offset)
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(GemmaQuantError, match=rf"tensor '{last.name}'.*byte offset {last.offset}.*truncated"):
        open_artifact(str(tmp_path / "cut.gguf"))
    (tmp_path / "head.gguf").write_bytes(data[:3000])  # cut inside the metadata
    with pytest.raises(GemmaQuantError, match=r"byte offset \d+ .*truncated or corrupt"):
        open_artifact(str(tmp_path / "head.gguf"))


def test_corrupt_gguf_scale_names_tensor_and_offset(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", "gemma3")
    info = GGUFFile(tmp_path / "t.gguf").tensors["blk.1.ffn_down.weight"]
    data = bytearray((tmp_path / "t.gguf").read_bytes())
    bad = info.offset + 3 * 34  # the 4th Q8_0 block's fp16 scale := NaN
    data[bad:bad + 2] = b"\x00\x7e"
    (tmp_path / "nan.gguf").write_bytes(bytes(data))
    with pytest.raises(GemmaQuantError, match=rf"'blk.1.ffn_down.weight'.*byte offset {bad}"):
        open_artifact(str(tmp_path / "nan.gguf"))
    data = bytearray((tmp_path / "t.gguf").read_bytes())
    rec = data.index(len(info.name).to_bytes(8, "little") + info.name.encode())  # its tensor-info record
    data[rec + 8 + len(info.name) + 4 + 16: rec + 8 + len(info.name) + 4 + 20] = \
        (99).to_bytes(4, "little")  # the GGML type field
    (tmp_path / "type.gguf").write_bytes(bytes(data))
    with pytest.raises(GemmaQuantError, match=r"'blk.1.ffn_down.weight'.*GGML type 99"):
        open_artifact(str(tmp_path / "type.gguf"))


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(100))
    with pytest.raises(GemmaQuantError, match="not a GGUF file and not a model directory"):
        open_artifact(str(tmp_path / "x.gguf"))


# -- the real llama.cpp-made demo GGUF vs llama.cpp itself -----------------------------------------
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based inks and a wooden press adapted from wine making. "
        "Within fifty years, printing shops had spread to more than two hundred cities across Europe, "
        "and the cost of books fell so sharply that reading became a skill ordinary merchants, artisans "
        "and students could hope to acquire. Scholars argue about how quickly these changes reshaped "
        "religion, science and politics, but few doubt that the press changed how ideas travelled.\n\n"
        "    Indented lines, numbers like 3.14159 and 2024, and punctuation — all tokenized alike.\n")


@pytest.fixture(scope="module")
def llama(demo_gguf):
    return open_llama(demo_gguf, n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False)


@pytest.fixture(scope="module")
def demo_art(demo_gguf):
    return open_artifact(str(demo_gguf), torch.float32)


def _llama_logits(llama, ids: list[int]) -> torch.Tensor:
    llama.reset()
    llama.eval(ids)
    return torch.from_numpy(np.array(llama.scores[: len(ids)], dtype=np.float32))


@pytest.mark.slow
@pytest.mark.llamacpp
def test_demo_gguf_logits_match_llama_cpp(demo_art, llama):
    ids = llama.tokenize(TEXT.encode(), add_bos=True, special=False)
    assert demo_art.tokenizer.encode(TEXT, add_bos=True, parse_special=False) == ids
    assert 100 < len(ids) < 200
    ref = _llama_logits(llama, ids)
    with torch.inference_mode():
        ours = demo_art.model(torch.tensor([ids]))[0]
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    rel = ((ours - ref).norm() / ref.norm()).item()
    # llama.cpp rounds activations to Q8_0/Q8_K in its matmuls, keeps K/V in fp16 and looks GELU up in
    # an fp16 table; a random tiny Gemma 3 shows the same 2-3 % gap between llama.cpp and transformers,
    # while we equal transformers to 1e-6 (test_tiny_gguf_matches_transformers). Which near-ties flip
    # follows llama.cpp's kernels for the CPU: 6 of 133 tokens on an AVX-512 machine (top-1 0.955, rel
    # 0.040, KL 0.0056), 7 of 133 on an AMD AVX2 one (0.947). So the check is on the flips themselves:
    # each is a token llama.cpp ranks within a small margin of its own first choice.
    flips = (ours.argmax(-1) != ref.argmax(-1)).nonzero().flatten()
    margins = ref.amax(-1)[flips] - ref[flips, ours.argmax(-1)[flips]]
    assert (margins < 0.5).all(), f"top-1 flips at tokens {flips.tolist()}, llama.cpp's margins {margins.tolist()}"
    assert top1 >= 0.9, top1
    assert rel < 0.05, rel


@pytest.mark.slow
@pytest.mark.llamacpp
def test_demo_gguf_perplexity_matches_llama_cpp(demo_art, llama):
    from gemmaquant.evaluate.perplexity import chunk_tokens, perplexity

    ids = llama.tokenize((TEXT * 4).encode(), add_bos=True, special=False)
    chunks = chunk_tokens(ids, 256, 2, 2)  # 254 scored tokens (benchmarks/: 1020 tokens, -0.41 %)
    first = 128

    def nll_llama():
        out = []
        for c in chunks:
            logits = _llama_logits(llama, c.tolist())
            out.append(chunk_nll(logits[first:-1], c[first + 1:]))
        return torch.cat(out).mean().item()

    ours = perplexity(lambda x, f: demo_art.model(x, logits_from=f), chunks).ppl
    ref = float(np.exp(nll_llama()))
    assert abs(ours / ref - 1) < 0.01, (ours, ref)


# -- our compressed-tensors outputs vs transformers + compressed-tensors ---------------------------
# TINY['ct-gemma3'] (tests/tiny.py): wide enough for group-128 INT4 and 2:4 blocks


def tiny_hf_dir(path, name="ct-gemma3", seed=0):
    """A tiny random HF checkpoint with a tokenizer.json (pieces p4.. as in the tiny GGUFs)."""
    from gemmaquant.formats.tokenizer_json import tokenizer_json_text
    from tests.tiny import make_tiny

    model = make_tiny(name, path, dtype=torch.bfloat16, seed=seed)
    toks, types = _pieces(512)
    (path / "tokenizer.json").write_text(
        tokenizer_json_text(list(zip(toks, [0.0] * 512, types)), unk_id=3, bos_id=2))
    return model


# w4a16-asym is left out: transformers 5.23 + compressed-tensors 0.20 re-initialise its packed
# zero points ("size mismatch ... weight_zero_point [8, 1] vs [64, 1]"), so they are no reference for
# it; PackedLinear's asym dequantization is checked against ct's decompressor in tests/model/test_qlinear.py.
@pytest.mark.parametrize("scheme", ["fp8", "int8", "w4a16"])
def test_ct_output_matches_transformers(tmp_path, scheme):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.compressed_tensors import write_compressed_tensors
    from gemmaquant.schemes import get_scheme

    tiny_hf_dir(tmp_path / "src")
    write_compressed_tensors(Checkpoint(tmp_path / "src"), get_scheme(scheme), tmp_path / "out", progress=False)
    art = open_artifact(str(tmp_path / "out"), torch.float32)
    assert art.kind == "compressed-tensors"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    ids = torch.randint(4, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    with torch.no_grad():
        ref = hf(ids).logits.float()
        ours = art.model(ids)
    nll_ref = chunk_nll(ref[:, :-1], ids[:, 1:]).mean().item()
    nll_ours = chunk_nll(ours[:, :-1], ids[:, 1:]).mean().item()
    assert abs(np.exp(nll_ours) / np.exp(nll_ref) - 1) < 0.01, (nll_ours, nll_ref)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # packed weights stay packed: the Linears hold about bits/8 bytes per weight
    expect = {"fp8": 8, "int8": 8, "w4a16": 4}[scheme]
    assert expect <= art.bpw_linear < expect + 0.6


def test_ct_truncated_names_tensor_and_offset(tmp_path):
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.compressed_tensors import write_compressed_tensors
    from gemmaquant.schemes import get_scheme

    tiny_hf_dir(tmp_path / "src")
    write_compressed_tensors(Checkpoint(tmp_path / "src"), get_scheme("fp8"), tmp_path / "out", progress=False)
    f = tmp_path / "out" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(GemmaQuantError, match=r"tensor '.*'.*byte \d+.*truncated"):
        open_artifact(str(tmp_path / "out"))
