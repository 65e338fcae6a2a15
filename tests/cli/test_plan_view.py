"""`quantize --dry-run`: one row per tensor role (with its count and layers), every tensor with --all,
every tensor in --json."""

from __future__ import annotations

import json

import pytest

from gemmaquant.cli.plan_view import group_rows, role_of
from tests.reliability import TINY_G3, run_cli, write_tiny

CFG = {**TINY_G3, "num_hidden_layers": 8, "hidden_size": 320, "head_dim": 64}  # 320: K-quant fallbacks


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan") / "tiny"
    write_tiny(d, CFG)
    return d


def test_roles():
    assert role_of("model.layers.12.mlp.down_proj.weight") == ("layers.*.mlp.down_proj", 12)
    assert role_of("blk.3.ffn_down.weight") == ("blk.*.ffn_down", 3)
    assert role_of("model.embed_tokens.weight") == ("embed_tokens", None)
    assert role_of("token_embd.weight") == ("token_embd", None)


def test_rows_group_by_role_type_and_reason():
    rows = [{"tensor": f"blk.{i}.ffn_down.weight", "shape": [64, 128], "type": "Q6_K" if i in (0, 3) else "Q4_K",
             "bytes": 10, "note": f"ffn_down {i}/4: use_more_bits -> Q6_K" if i in (0, 3) else "default Q4_K"}
            for i in range(4)]
    g = group_rows(rows)
    assert [(x["role"], x["type"], x["count"], x["layers"], x["bytes"]) for x in g] == [
        ("blk.*.ffn_down", "Q6_K", 2, [0, 3], 20), ("blk.*.ffn_down", "Q4_K", 2, [1, 2], 20)]
    assert g[0]["note"] == "ffn_down i/4: use_more_bits -> Q6_K"  # the per-layer counter is not a new role


@pytest.mark.parametrize("scheme,role", [("q4_k_m", "blk.*.ffn_down"), ("int8-w8a16", "layers.*.mlp.down_proj")])
def test_dry_run_prints_roles_all_prints_tensors(src, capsys, scheme, role, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    res = run_cli(["quantize", src, "--scheme", scheme, "--dry-run"], capsys)
    assert res.code == 0, res.stderr
    assert role in res.stdout and "×8" in res.stdout and ".7." not in res.stdout
    assert "--all lists each tensor" in res.stdout and "Nothing was written" in res.stdout
    res_all = run_cli(["quantize", src, "--scheme", scheme, "--dry-run", "--all"], capsys)
    assert res_all.code == 0 and role.replace("*", "7") in res_all.stdout
    res_json = run_cli(["quantize", src, "--scheme", scheme, "--dry-run", "--json"], capsys)
    plan = json.loads(res_json.stdout)
    n_tensors = 2 + 8 * 13  # embedding + final norm; 7 Linears and 6 norms per Gemma 3 layer
    assert len(plan["tensors"]) == n_tensors and plan["scheme"] == scheme
    assert len(res.stdout.splitlines()) < n_tensors < len(res_all.stdout.splitlines())


def test_dry_run_refuses_what_the_run_would(src, capsys):
    """w4a16's group 128 does not divide this model's 320-wide inputs: the dry run says so, as the run would."""
    res = run_cli(["quantize", src, "--scheme", "w4a16", "--dry-run"], capsys)
    assert res.code == 2 and "not divisible by the group size 128" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
