"""Every shipped recipe validates against the scheme registry; bad recipes name the key and the allowed values."""

from __future__ import annotations

import pytest

from gemmaquant.errors import GemmaQuantError
from gemmaquant.recipes import KEYS, load_recipe, shipped_recipes
from gemmaquant.schemes import SCHEMES
from tests.llamacpp import open_llama

REQUIRED = {  # the uses the issues ask recipes for
    "gemma-2-9b-it-fp8", "gemma-2-27b-it-fp8", "gemma-7b-it-int8", "gemma-2b-w4a16", "gemma-2-2b-it-w4a16",
    "gemma-2-2b-it-q6_k", "gemma-3-1b-it-q4_k_m-imatrix", "gemma-3-270m-q8_0",
    "gemma-4-e4b-it-q4_k_m", "gemma-4-31b-it-fp8", "gemma-4-26b-a4b-it-w4a16",
}


def test_the_required_recipes_are_shipped():
    assert REQUIRED <= set(shipped_recipes())


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates_and_documents_itself(name):
    r = load_recipe(name)
    assert r.scheme.name in SCHEMES
    text = r.path.read_text()
    assert text.startswith("#"), "a recipe starts with a comment saying what it is for"
    assert "Cost" in text and ("drift" in text.lower()), "and what it costs"


@pytest.mark.parametrize("body, words", [
    ('scheme = "fp8"\nbits = 4\n', ["unknown key 'bits'", "calib_samples"]),
    ('scheme = "fp9"\n', ["unknown scheme 'fp9'", "w4a16"]),
    ('scheme = "fp8"\nalgorithm = "gptq"\n', ["algorithm 'gptq'", "rtn"]),
    ('scheme = "w4a16"\nimatrix = true\n', ["imatrix", "GGUF"]),
    ('scheme = "int8"\nalpha = 3\n', ["alpha", "0..1"]),
    ('scheme = "int8"\ncalib_samples = "many"\n', ["calib_samples", "int"]),
    ('algorithm = "rtn"\n', ["missing required key 'scheme'"]),
    ('scheme = [\n', ["not valid TOML"]),
    ('scheme = "fp8"\ngroup_size = 64\n', ["group_size 64", "fp8", "per-channel"]),
    ('scheme = "w4a16"\ngroup_size = 96\n', ["group_size 96", "32, 64, 128"]),
    ('scheme = "q4_k_m"\ngroup_size = 64\n', ["'group_size'", "compressed-tensors", "q4_k_m"]),
    ('scheme = "q4_k_m"\nignore = ["lm_head"]\n', ["'ignore'", "compressed-tensors"]),
    ('scheme = "w4a16"\nignore = "re:.*down_proj$"\n', ["'ignore'", "list of strings"]),
    ('scheme = "w4a16"\nignore = [1]\n', ["'ignore'", "list of strings"]),
    ('scheme = "w4a16"\nignore = ["re:.*(down"]\n', ["ignore entry 're:.*(down'", "regex"]),
])
def test_bad_recipes(tmp_path, body, words):
    p = tmp_path / "r.toml"
    p.write_text(body)
    with pytest.raises(GemmaQuantError) as e:
        load_recipe(str(p))
    for w in words:
        assert w in str(e.value)
    assert str(p) in str(e.value) or "unknown scheme" in str(e.value)


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(GemmaQuantError, match="gemma-3-270m-q8_0"):
        load_recipe("no-such-recipe")


def test_every_key_is_documented():
    assert all(desc for _, desc in KEYS.values())


@pytest.mark.slow
def test_the_demo_recipe_runs_end_to_end_and_llama_cpp_loads_it(demo_dir, tmp_path):
    """`gemmaquant quantize demo --recipe gemma-3-270m-q8_0`: the recipe's scheme, a GGUF llama.cpp loads."""
    import json
    import subprocess
    import sys

    out = tmp_path / "g.gguf"
    r = subprocess.run([sys.executable, "-m", "gemmaquant.cli", "quantize", str(demo_dir), "--recipe",
                        "gemma-3-270m-q8_0", "-o", str(out), "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["scheme"] == "q8_0" and summary["tensor_types"] == {"F32": 109, "Q8_0": 127}
    llm = open_llama(out, n_ctx=64, verbose=False)
    toks = llm.tokenize(b"The GNU General Public License", add_bos=True)
    llm.eval(toks)
    assert llm.n_tokens == len(toks)


# The Gemma 4 recipes on checkpoints of the released models' shapes (benchmarks/make_synthetic.py
# --sparse: headers only). What vLLM's kernels take is written out here from their sources
# (marlin_utils.verify_marlin_supports_shape / check_moe_marlin_supports_layer), so that a recipe
# whose file vLLM would refuse fails this test even where our own plan-time rules miss it.
GEMMA4_RECIPES = {"gemma-4-e4b-it-q4_k_m": "gemma-4-e4b", "gemma-4-31b-it-fp8": "gemma-4-31b",
                  "gemma-4-26b-a4b-it-w4a16": "gemma-4-26b-a4b"}


def _synth():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "make_synthetic", Path(__file__).resolve().parents[1] / "benchmarks" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def real_shapes(tmp_path_factory):
    from tests.tiny_gemma4 import tiny_tokenizer

    root = tmp_path_factory.mktemp("g4real")
    tiny_tokenizer(root / "tok")  # the plan reads the vocabulary's size only; the shapes are the real ones
    synth = _synth()
    return {m: synth.make_checkpoint(m, root / m, tokenizer_dir=root / "tok", sparse=True) for m in synth.GEMMA4}


def _plan(model_dir, scheme, settings):
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.pipeline import QuantizeOptions, plan_rows

    ck = Checkpoint(model_dir)
    opts = QuantizeOptions(**settings)
    return ck, plan_rows(ck, scheme, opts)


@pytest.mark.parametrize("name", sorted(GEMMA4_RECIPES))
def test_gemma4_recipes_plan_on_the_real_shapes(real_shapes, name):
    r = load_recipe(name)
    ck, rows = _plan(real_shapes[GEMMA4_RECIPES[name]], r.scheme, r.settings)
    assert r.model.lower().startswith("google/" + GEMMA4_RECIPES[name])
    cfg = ck.config
    assert cfg.num_hidden_layers == {"gemma-4-e4b": 42, "gemma-4-31b": 60, "gemma-4-26b-a4b": 30}[GEMMA4_RECIPES[name]]
    if r.scheme.is_gguf:
        assert {"per_layer_token_embd.weight", "per_layer_model_proj.weight"} <= {x["tensor"] for x in rows}
        return
    quantized = [x for x in rows if "packed" in x["type"] or "fp8" in x["type"]]
    assert quantized
    if r.scheme.ct_format != "pack-quantized":
        return
    g = r.scheme.weights.group_size
    for x in quantized:
        *e, n, k = x["shape"]
        if e:  # experts: the Marlin MoE kernel
            assert cfg.hidden_size % 128 == 0 and cfg.moe_intermediate_size % max(64, g) == 0, x
        else:  # dense Linears: the Marlin GEMM
            assert k % 128 == 0 and n % 64 == 0 and k % g == 0, x
    assert any(x["shape"][0] == cfg.num_experts for x in quantized)  # the experts are quantized


def test_the_26b_a4b_needs_what_the_recipe_changes(real_shapes):
    """The scheme's defaults (group 128, every Linear) are refused on the real 26B-A4B, so the recipe's
    group_size and ignore are what make it loadable; an ignore entry that matches nothing is refused."""
    from gemmaquant.schemes import get_scheme

    model = real_shapes["gemma-4-26b-a4b"]
    with pytest.raises(GemmaQuantError, match="moe_intermediate_size 704"):
        _plan(model, get_scheme("w4a16"), {"algorithm": "rtn"})
    _, rows = _plan(model, get_scheme("w4a16").customized(group_size=64), {"algorithm": "rtn"})
    assert [x for x in rows if x["tensor"].endswith("mlp.down_proj.weight") and "packed" in x["type"]
            and x["shape"][1] % 128]  # without the ignore entry the dense down_proj (2112 wide) is packed
    with pytest.raises(GemmaQuantError, match="matches none of this model's Linears"):
        _plan(model, get_scheme("w4a16").customized(group_size=64, ignore=["re:.*mlp\\.down_prj$"]),
              {"algorithm": "rtn"})
