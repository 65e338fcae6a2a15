"""Checks shared by the tests of the GGML type-family modules (kquants_low, iq4, iq3, iq2, iq1,
ternary): our quantizer's bytes against llama.cpp's own `ggml_quantize_chunk` (libggml-base, bound in
`libggml.py`), on real demo tensors and on random rows with outliers, zero and tiny sub-blocks; our
dequantizer against the `gguf` package's numpy one, bit for bit. Fixtures: `conftest.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gemmaquant.numerics.ggml.dequantize import dequantize
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.registry import REQUIRES_IMATRIX
from gemmaquant.numerics.ggml.types import GGMLType, row_bytes
from tests.numerics.ggml.libggml import ggml_quantize, require_libggml
from tests.numerics.ggml.test_quantize import assert_same_blocks, imatrix, synthetic

# Real Gemma 3 270M weights (HF names): rows of 2048 (down_proj) and 1024 (o_proj) take the
# 256-weight types; gate_proj/q_proj rows of 640 only the 32-weight ones (IQ4_NL).
DEMO_256 = ["model.layers.0.mlp.down_proj.weight", "model.layers.9.self_attn.o_proj.weight",
            "model.layers.17.mlp.down_proj.weight"]  # fmt: skip
DEMO_32 = ["model.layers.3.mlp.gate_proj.weight", "model.layers.12.self_attn.q_proj.weight"]


def demo_rows(demo_dir: Path, name: str, rows: int) -> torch.Tensor:
    """The first `rows` rows of a demo checkpoint tensor (bf16 on disk), as float32."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(Path(demo_dir) / "model.safetensors"), "pt") as f:
        return f.get_slice(name)[:rows].float().contiguous()


def edge_rows(n: int, seed: int = 0) -> torch.Tensor:
    """Rows whose sub-blocks (16 and 32 weights) mix the cases that trip scale searches: all zero,
    tiny (fp16 scales underflow; 1e-9 is above the IQ zero tests of 1e-12..1e-7, 1e-14 below some),
    a lone outlier, exact ties of equal magnitude, and ordinary N(0, 0.02) weights."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(8, n, generator=g) * 0.02
    sub = torch.arange(n) // 16
    rows = [
        torch.where(sub % 3 == 0, 0.0, base[0]),  # every third sub-block of 16 zero
        torch.where(sub % 2 == 0, base[1] * 1e-7, base[1]),  # tiny sub-blocks next to live ones
        torch.where(sub % 4 == 1, base[2] * (1e-14 / 0.02), base[2] * 1e-5),
        base[3].clone().index_fill_(0, torch.arange(7, n, 97), 1.5),  # sparse outliers
        torch.sign(base[4]) * 0.015,  # two values only: ties everywhere
        torch.round(base[5] / 0.004) * 0.004,  # few distinct values
        torch.where((torch.arange(n) // 32) % 2 == 0, 0.0, base[6] * 1e-9),
        base[7].bfloat16().float(),
    ]
    return torch.stack(rows)


def check_against_libggml(qtype: GGMLType, w: torch.Tensor, im: torch.Tensor | None) -> None:
    require_libggml()
    assert_same_blocks(quantize(w, qtype, im), ggml_quantize(w, qtype, im), qtype)


def random_rows(rows: int, n: int, seed: int) -> torch.Tensor:
    """`synthetic` rows (outliers, zero/constant/tiny rows) followed by `edge_rows`."""
    return torch.cat([synthetic(rows, n, seed=seed), edge_rows(n, seed=seed)])


def check_random_rows(qtype: GGMLType, with_imatrix: bool, rows: int, extra=None) -> None:
    """`random_rows` (plus `extra(n)` rows where given) of 1024 and of 256 weights, each seed with
    its own importance matrix where `with_imatrix`, byte-identical to libggml."""
    for seed, n in ((0, 1024), (1, 256)):
        w = random_rows(rows, n, seed=seed)
        if extra is not None:
            w = torch.cat([w, extra(n)])
        check_against_libggml(qtype, w, imatrix(n, seed=seed + 7) if with_imatrix else None)


def check_demo_tensors(demo_dir: Path, qtype: GGMLType, with_imatrix: bool, rows: int,
                       names: list[str] = DEMO_256) -> None:
    """The first `rows` rows of each named demo tensor byte-identical to libggml."""
    for name in names:
        w = demo_rows(demo_dir, name, rows)
        check_against_libggml(qtype, w, imatrix(w.shape[1]) if with_imatrix else None)


def imatrix_cases(types: list[GGMLType]) -> list[tuple[GGMLType, bool]]:
    """(type, with an imatrix) for each type, without the reference path where llama.cpp needs one."""
    return [(t, im) for t in types for im in (False, True) if im or t not in REQUIRES_IMATRIX]


def case_id(case: tuple[GGMLType, bool]) -> str:
    return f"{case[0].name}-{'imatrix' if case[1] else 'ref'}"


def gguf_dequantize(data: np.ndarray, qtype: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    gguf = pytest.importorskip("gguf")
    with np.errstate(invalid="ignore", over="ignore"):
        return gguf.quants.dequantize(data, gguf.GGMLQuantizationType(int(qtype))).reshape(shape).astype(np.float32)


def assert_bit_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    """Same float32 bits; NaNs only need to be NaN on both sides (payloads of random bytes vary)."""
    o = ours.cpu().numpy()
    assert o.dtype == np.float32 and o.shape == ref.shape
    differ = o.view(np.uint32) != ref.view(np.uint32)
    differ &= ~(np.isnan(o) & np.isnan(ref))
    assert not differ.any(), f"{int(differ.sum())} of {differ.size} values differ, first at {np.argwhere(differ)[0]}"


def check_dequantize_random_bytes(qtype: GGMLType, rows: int = 16, n: int = 1024) -> None:
    # Every bit pattern: subnormal/inf/NaN scales, every index and sign pattern.
    data = torch.randint(0, 256, (rows * row_bytes(qtype, n),), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(int(qtype)))  # fmt: skip
    shape = (rows, n)
    assert_bit_equal(dequantize(data, qtype, shape), gguf_dequantize(data.numpy().reshape(rows, -1), qtype, shape))


def check_dequantize_bytes(qtype: GGMLType, data: torch.Tensor, shape: tuple[int, int]) -> None:
    assert_bit_equal(dequantize(data, qtype, shape), gguf_dequantize(data.numpy(), qtype, shape))
