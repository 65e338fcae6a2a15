"""`quantize --algorithm gptq` and `--target-bpw/--target-size` for GGUF schemes (gemmaquant/export/gguf/optimized.py).

References: gguf-py's GGUFReader (layout, keys), llama.cpp through llama-cpp-python (the file loads and
gives finite logits), our plain preset writer (itself byte-identical to llama-quantize) for the layout
an optimized file must keep, and brute force for the budget solver."""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest

from gemmaquant.calib.budget import Option, parse_size, solve, tensor_bytes
from gemmaquant.errors import GemmaQuantError
from gemmaquant.numerics.ggml.types import GGMLType
from gemmaquant.export.gguf.optimized import (KEY_ALGORITHM, KEY_PLAN, KEY_TARGET, check_request, make_budget,
                                              preset_file_bytes)
from gemmaquant.schemes import get_scheme

from tests.reliability import check_error, run_cli, write_tiny

T = GGMLType
CALIB = ["--calib-samples", "2", "--calib-len", "32"]


# ---- fast: the solver and the request checks ----

def _problem(seed: int, n_tensors: int = 4, n_opts: int = 4):
    rng = np.random.default_rng(seed)
    types = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]
    opts = {}
    for i in range(n_tensors):
        sizes = np.sort(rng.integers(10, 200, n_opts)) * 32
        dmg = np.sort(rng.random(n_opts))[::-1] * rng.random() * 10
        opts[f"t{i}"] = [Option(types[k], int(s), float(d)) for k, (s, d) in enumerate(zip(sizes, dmg))]
    return opts


@pytest.mark.parametrize("seed", range(12))
def test_budget_solver_is_optimal_on_small_problems(seed):
    opts = _problem(seed)
    names = list(opts)
    lo = sum(min(o.nbytes for o in v) for v in opts.values())
    hi = sum(max(o.nbytes for o in v) for v in opts.values())
    for budget in np.linspace(lo, hi, 7).astype(int):
        best = min(sum(c.damage for c in combo) for combo in itertools.product(*opts.values())
                   if sum(c.nbytes for c in combo) <= budget)
        got = solve(opts, int(budget))
        assert sum(c.nbytes for c in got.values()) <= budget
        assert sum(c.damage for c in got.values()) == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert set(got) == set(names)


def test_budget_below_the_smallest_choice_is_refused():
    opts = _problem(0)
    lo = sum(min(o.nbytes for o in v) for v in opts.values())
    with pytest.raises(GemmaQuantError, match="below the smallest possible size"):
        solve(opts, lo - 1)


def test_tensor_bytes_are_ggml_row_bytes_padded():
    assert tensor_bytes((640, 2048), T.Q4_K) == 640 * 8 * 144  # 2048/256 super-blocks of 144 bytes
    assert tensor_bytes((3, 32), T.Q4_0) == 64  # 3 × 18 = 54 bytes, padded to 32
    assert tensor_bytes((640,), T.F32) == 2560


@pytest.mark.parametrize("text,want", [("1.2GB", 1_200_000_000), ("900MiB", 900 << 20), ("123456", 123456),
                                       ("0.5 kB", 500)])
def test_sizes(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "abc", "-1GB", "1.2XB", "0", "presets"])
def test_bad_sizes(text):
    with pytest.raises(GemmaQuantError, match="--target-size .* nor 'preset'"):
        make_budget(None, text)


@pytest.mark.parametrize("scheme,algorithm,bpw,size,match", [
    ("q4_k_m", "awq", None, None, "allowed: rtn, gptq"),
    ("bf16", "gptq", None, None, "bf16 is not quantized"),
    ("f16", None, 4.5, None, "--target-bpw needs a quantized GGUF scheme"),
    ("w4a16", None, None, "1GB", "--target-size applies to GGUF schemes only"),
    ("q4_k_m", None, 4.5, "1GB", "exclude each other"),
    ("q4_k_m", None, 0.0, None, "--target-bpw 0.0"),
    ("q4_k_m", None, None, "lots", "--target-size 'lots'"),
    ("w4a16", None, None, "preset", "--target-size applies to GGUF schemes only"),
    ("q4_k_m", None, 4.5, "preset", "exclude each other"),
])
def test_unsupported_combinations_are_one_clear_error(scheme, algorithm, bpw, size, match):
    with pytest.raises(GemmaQuantError, match=match):
        check_request(get_scheme(scheme), algorithm, make_budget(bpw, size), False)


def test_gptq_on_a_type_without_error_feedback_is_refused():
    from dataclasses import replace

    s = replace(get_scheme("q4_k_m"), name="iq2_xxs", default_type="IQ2_XXS")
    with pytest.raises(GemmaQuantError, match="IQ2_XXS has no error-feedback rounding"):
        check_request(s, "gptq", None, False)


def test_gptq_warns_when_calibration_has_fewer_tokens_than_the_widest_input():
    from gemmaquant.export.gguf.optimized import few_tokens_note
    from gemmaquant.export.gguf.plan import TensorPlan

    plans = [TensorPlan("blk.0.attn_q.weight", "q", (1024, 640), T.Q4_K, ""),
             TensorPlan("blk.0.ffn_down.weight", "d", (640, 2048), T.Q4_K, "")]
    note = few_tokens_note(1024, plans)
    assert note.startswith("warning:") and "1024 tokens" in note and "2048 input columns of blk.0.ffn_down" in note
    assert few_tokens_note(2048, plans) is None
    assert few_tokens_note(0, []) is None


# ---- slow: whole files from a tiny checkpoint, judged by gguf-py and llama.cpp ----

@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt") / "tiny"
    write_tiny(d, seed=11)  # hidden 256: K-quants without fallback
    return d


def quantize_json(src, out, capsys, *extra, threads=1, scheme="q4_k_m"):
    """`quantize SRC --scheme q4_k_m` with the tiny calibration; its --json summary."""
    res = run_cli(["quantize", src, "--scheme", scheme, "-o", out, "--json", "--quiet", "--threads", threads,
                   *CALIB, *extra], capsys)
    assert res.code == 0, res.stderr
    return json.loads(res.stdout)


def layout_of(path):
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return r, {t.name: (int(t.tensor_type), tuple(int(x) for x in t.shape), int(t.data_offset)) for t in r.tensors}


def kv_value(reader, key):
    f = reader.fields[key]
    if len(f.data) == 1 and f.types[-1].name == "STRING":
        return bytes(f.parts[f.data[0]]).decode()
    return [bytes(f.parts[i]).decode() for i in f.data]


def _finite_logits(path):
    from tests.llamacpp import open_llama

    llm = open_llama(path, n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    toks = [2, 17, 99, 250, 4, 31]
    llm.eval(toks)
    assert np.isfinite(np.asarray(llm.scores[: len(toks)])).all()


@pytest.mark.slow
@pytest.mark.llamacpp
def test_gptq_file_keeps_the_preset_layout_loads_in_llama_cpp_and_reruns_identically(src, tmp_path, capsys,
                                                                                      monkeypatch):
    from gemmaquant.export.gguf import patch

    plain = tmp_path / "plain.gguf"
    quantize_json(src, plain, capsys, "--imatrix")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    copies = []
    real_copy = patch.shutil.copyfile
    monkeypatch.setattr(patch.shutil, "copyfile", lambda x, y: copies.append(x) or real_copy(x, y))
    sa = quantize_json(src, a, capsys, "--algorithm", "gptq", threads=1)
    assert copies == []  # the scratch template is moved into place: one file's disk, not two
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "plain.gguf"]  # no scratch left
    quantize_json(src, b, capsys, "--algorithm", "gptq", threads=2)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    ra, la = layout_of(a)
    _, lp = layout_of(plain)
    # same names, types and shapes as llama.cpp's q4_k_m with an imatrix; offsets shift only by the
    # header's extra keys, and equally for every tensor
    assert {n: v[:2] for n, v in la.items()} == {n: v[:2] for n, v in lp.items()}
    shift = {la[n][2] - lp[n][2] for n in la}
    assert len(shift) == 1
    assert kv_value(ra, KEY_ALGORITHM).startswith("gptq")
    assert any("error feedback" in n for n in sa["notes"])
    # 2 x 32 calibration tokens against the tiny model's 256-wide (and wider) inputs: said
    assert any(n.startswith("warning: --algorithm gptq calibrated on 64 tokens") for n in sa["notes"])
    # the codes differ from llama.cpp's (else nothing was optimized); token_embd is llama.cpp's
    rp, _ = layout_of(plain)
    raw = lambda r, name: next(bytes(t.data) for t in r.tensors if t.name == name)  # noqa: E731
    assert raw(ra, "blk.0.ffn_down.weight") != raw(rp, "blk.0.ffn_down.weight")
    assert raw(ra, "token_embd.weight") == raw(rp, "token_embd.weight")
    _finite_logits(a)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_target_size_is_met_to_the_byte_recorded_and_loads(src, tmp_path, capsys):
    plain = tmp_path / "plain.gguf"
    quantize_json(src, plain, capsys)
    target = plain.stat().st_size * 85 // 100
    out = tmp_path / "budget.gguf"
    dry = run_cli(["quantize", src, "--scheme", "q4_k_m", "-o", out, "--dry-run", "--json", "--threads", 1,
                   *CALIB, "--algorithm", "gptq", "--target-size", target], capsys)
    assert dry.code == 0, dry.stderr
    planned = {r["tensor"]: r["type"] for r in json.loads(dry.stdout)["tensors"]}
    s = quantize_json(src, out, capsys, "--algorithm", "gptq", "--target-size", target)
    size = out.stat().st_size
    assert size == s["output_bytes"] <= target
    r, layout = layout_of(out)
    got = {n: T(v[0]).name for n, v in layout.items()}
    assert got == planned  # the dry run's plan is the file's
    assert len(set(got.values()) - {"F32"}) > 1  # a real mix, not the preset
    plan = dict(e.split("=") for e in kv_value(r, KEY_PLAN))
    assert plan == {n: t for n, t in got.items() if t != "F32"}
    assert str(target) in kv_value(r, KEY_TARGET).replace(",", "")
    _finite_logits(out)


@pytest.mark.parametrize("scheme", ["q4_k_m", "q3_k_m", "q4_0", "q6_k"])
def test_preset_size_is_the_size_of_the_presets_own_file(src, tmp_path, scheme):
    """What `--target-size preset` aims at: the file our plain writer makes for the preset (byte-identical
    to llama-quantize's, tests/export/gguf/test_writer_presets.py), to the byte."""
    from gemmaquant.export.gguf.writer import write_gguf
    from gemmaquant.formats.checkpoint import Checkpoint

    out = tmp_path / "plain.gguf"
    write_gguf(Checkpoint(src), scheme, out)
    assert preset_file_bytes(Checkpoint(src), get_scheme(scheme)) == out.stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["q3_k_m", "q4_0"])
def test_target_size_preset_fits_the_presets_file_and_says_so(src, tmp_path, capsys, scheme):
    plain = tmp_path / "plain.gguf"
    quantize_json(src, plain, capsys, scheme=scheme)
    out = tmp_path / "budget.gguf"
    s = quantize_json(src, out, capsys, "--target-size", "Preset", scheme=scheme)
    assert out.stat().st_size == s["output_bytes"] <= plain.stat().st_size
    r, layout = layout_of(out)
    assert kv_value(r, KEY_TARGET) == f"--target-size preset ({plain.stat().st_size:,} bytes, the {scheme} file's)"
    plan = dict(e.split("=") for e in kv_value(r, KEY_PLAN))
    assert plan == {n: T(v[0]).name for n, v in layout.items() if T(v[0]) != T.F32}
    assert any(f"--target-size preset ({plain.stat().st_size:,} bytes" in n for n in s["notes"])


@pytest.mark.slow
def test_target_size_preset_in_a_set_is_each_presets_own_size(src, tmp_path, capsys):
    res = run_cli(["quantize", src, "--scheme", "q4_0,q3_k_m", "--out", f"{tmp_path / 'budget'}/", "--target-size",
                   "preset", "--quiet", "--threads", 1, *CALIB], capsys)
    assert res.code == 0, res.stderr
    res = run_cli(["quantize", src, "--scheme", "q4_0,q3_k_m", "--out", f"{tmp_path / 'plain'}/", "--quiet"], capsys)
    assert res.code == 0, res.stderr
    for name in ("Q4_0", "Q3_K_M"):
        plain, tuned = (tmp_path / d / f"{src.name}.{name}.gguf" for d in ("plain", "budget"))
        assert tuned.stat().st_size <= plain.stat().st_size
        r, _ = layout_of(tuned)
        assert kv_value(r, KEY_TARGET).startswith(f"--target-size preset ({plain.stat().st_size:,} bytes, the "
                                                  f"{name.lower()} file's)")


@pytest.mark.slow
def test_target_bpw_and_errors(src, tmp_path, capsys):
    out = tmp_path / "bpw.gguf"
    s = quantize_json(src, out, capsys, "--target-bpw", "4.0", "--card")
    card = (tmp_path / "README.md").read_text()
    assert "size budget --target-bpw 4" in card and "not its codes or type mix" in card
    r, layout = layout_of(out)
    data = sum(tensor_bytes(v[1][::-1], T(v[0])) for v in layout.values())
    n = sum(int(np.prod(v[1])) for v in layout.values())
    assert 8 * data / n <= 4.0
    assert not any("error feedback" in x for x in s["notes"])  # rtn: llama.cpp's rounding of the mix
    res = run_cli(["quantize", src, "--scheme", "q4_k_m", "-o", tmp_path / "x.gguf", *CALIB,
                   "--target-size", "10kB"], capsys)
    check_error(res, 2, "below the smallest file these tensors allow")
    assert not (tmp_path / "x.gguf").exists()
