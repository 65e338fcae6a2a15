"""Loading compressed-tensors Linears through their format objects (numerics/ct/formats.py): llm-compressor's
mixed-precision layout (one config group per format, or no format named at all) opens as the single-format
files it is made of, and a Linear whose tensors contradict its format is one line naming the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemmaquant.errors import GemmaQuantError
from gemmaquant.evaluate.artifact import open_artifact
from gemmaquant.model.gemma import Gemma
from gemmaquant.model.qlinear import FP8Linear, PackedLinear, QuantEmbedding
from tests.evaluate.test_artifact import tiny_hf_dir


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{scheme: our compressed-tensors output} of one tiny checkpoint."""
    from gemmaquant.export.compressed_tensors import write_compressed_tensors
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.schemes import get_scheme

    root = tmp_path_factory.mktemp("ct")
    tiny_hf_dir(root / "src")
    out = {}
    for scheme in ("fp8", "w4a16"):
        write_compressed_tensors(Checkpoint(root / "src"), get_scheme(scheme), root / scheme, progress=False)
        out[scheme] = root / scheme
    return out


def _qc(d):
    return json.loads((d / "config.json").read_text())["quantization_config"]


def _rewrite(d, qc=None, tensors=None):
    cfg = json.loads((d / "config.json").read_text())
    if qc is not None:
        cfg["quantization_config"] = qc
        (d / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _mixed(written, dst, group_formats: bool):
    """llm-compressor's mixed-precision layout: attention FP8 (dynamic), MLP W4A16, one group each."""
    shutil.copytree(written["w4a16"], dst)
    attn = {k: v for k, v in load_file(written["fp8"] / "model.safetensors").items() if ".self_attn." in k}
    mlp = {k: v for k, v in load_file(written["w4a16"] / "model.safetensors").items() if ".self_attn." not in k}
    fp8, w4 = _qc(written["fp8"]), _qc(written["w4a16"])
    g_attn = {**fp8["config_groups"]["group_0"], "targets": ["re:.*self_attn.*"]}
    g_mlp = {**w4["config_groups"]["group_0"], "targets": ["re:.*mlp.*"]}
    if not group_formats:
        del g_attn["format"], g_mlp["format"]
    _rewrite(dst, {**w4, "format": "mixed-precision", "config_groups": {"group_0": g_attn, "group_1": g_mlp}},
             {**mlp, **attn})
    return dst


@pytest.mark.parametrize("group_formats", [True, False], ids=["group-formats", "from-tensors"])
def test_mixed_precision_opens_as_its_parts(written, tmp_path, group_formats):
    art = open_artifact(str(_mixed(written, tmp_path / "mixed", group_formats)))
    # the same model class, the tied head a QuantEmbedding through Gemma's head hook
    assert type(art.model) is Gemma and isinstance(art.model.model.embed_tokens, QuantEmbedding)
    parts = {s: dict(open_artifact(str(written[s])).model.named_modules()) for s in written}
    n, fmts = 0, set()
    for name, m in art.model.named_modules():
        if name.endswith("_proj") and name.startswith("model.layers."):
            want = FP8Linear if ".self_attn." in name else PackedLinear
            assert isinstance(m, want), name
            ref = parts["fp8" if want is FP8Linear else "w4a16"][name]
            assert m.fmt == ref.fmt and torch.equal(m.dequantize(), ref.dequantize()), name
            n += 1
            fmts.add(ref.fmt)
    assert n == sum(len(art.config.linear_shapes(i)) for i in range(art.config.num_hidden_layers))
    assert set(art.formats) == fmts and len(fmts) > 1


def test_num_bits_outside_the_format_is_named(written, tmp_path):
    d = shutil.copytree(written["w4a16"], tmp_path / "o")
    qc = _qc(d)
    qc["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    _rewrite(d, qc)
    with pytest.raises(GemmaQuantError, match=r"model.layers.0.self_attn.q_proj: pack-quantized num_bits 3 "
                                              r"\(allowed: 4, 8\)"):
        open_artifact(str(d))


def test_tensors_of_another_format_are_named(written, tmp_path):
    """config.json says pack-quantized, the tensors are FP8: the missing tensor is named, not guessed around."""
    d = shutil.copytree(written["fp8"], tmp_path / "o")
    _rewrite(d, _qc(written["w4a16"]))
    with pytest.raises(GemmaQuantError, match=r"/o: no tensor 'model.layers.0.self_attn.q_proj.weight_packed' "
                                              r"\(format 'pack-quantized' stores it\)"):
        open_artifact(str(d))


def test_wrong_scale_shape_is_named(written, tmp_path):
    d = shutil.copytree(written["fp8"], tmp_path / "o")
    t = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight_scale"
    t[name] = t[name][:3].contiguous()
    _rewrite(d, tensors=t)
    with pytest.raises(GemmaQuantError, match=rf"tensor '{name}' has shape \[3, 1\]; expected \[\d+, 1\] "
                                              r"\(per channel\) or \[1\] \(per tensor\)"):
        open_artifact(str(d))


def test_static_activations_need_input_scales(written, tmp_path):
    d = shutil.copytree(written["fp8"], tmp_path / "o")
    qc = _qc(d)
    qc["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    _rewrite(d, qc)
    with pytest.raises(GemmaQuantError, match=r"model.layers.0.self_attn.q_proj: static input activations but no "
                                              r"'model.layers.0.self_attn.q_proj.input_scale'"):
        open_artifact(str(d))
