"""Our GGML quantizers against llama.cpp's own `ggml_quantize_chunk` (libggml-base via ctypes):
identical bytes for 100% of blocks, with and without an importance matrix."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.errors import GemmaQuantError
from gemmaquant.numerics.ggml.quantize import quantize
from gemmaquant.numerics.ggml.types import BLOCK, GGMLType, row_bytes
from tests.numerics.ggml.demo_gguf import bf16_weight
from tests.numerics.ggml.libggml import ggml_quantize, require_libggml

QUANT_TYPES = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
               GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]  # fmt: skip
FLOAT_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On a loaded 2-core machine torch's OpenMP barriers cost ~10 ms per op; results do not
    # depend on the thread count (every reduction is an explicit sequential loop).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def synthetic(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """N(0, 0.02) with 0.1% outliers of ±0.5..2, plus the edge rows that broke earlier attempts."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * 0.02
    out = torch.rand(rows, n, generator=g) < 0.001
    k = int(out.sum())
    w[out] = (torch.rand(k, generator=g) * 1.5 + 0.5) * torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    src = torch.randn(6, n, generator=g) * 0.02
    edge = [
        torch.zeros(n),  # all-zero blocks (dmin must stay +0.0)
        torch.cat([torch.zeros(n // 2), w[0, n // 2 :]]),  # zero sub-blocks next to live ones
        torch.full((n,), 0.0123),  # constant
        src[1].abs(),  # all positive
        -src[2].abs(),  # all negative
        torch.zeros(n).index_fill_(0, torch.tensor([5]), 0.3),  # single non-zero
        src[3] * (1e-12 / 0.02),  # tiny scales: fp16 d underflows
        src[4] * (1e-18 / 0.02),  # below GROUP_MAX_EPS
        torch.where(torch.arange(n) % 32 < 16, 0.0, src[5]),  # half-zero 32-blocks
    ]
    k = min(rows, len(edge))
    w[:k] = torch.stack(edge)[:k]
    return w


def imatrix(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    im = torch.rand(n, generator=g) * 3
    im[torch.rand(n, generator=g) < 0.1] = 0.0  # unused columns
    return im


def assert_same_blocks(ours: torch.Tensor, ref: torch.Tensor, qtype: GGMLType) -> None:
    nbytes = BLOCK[qtype][1]
    o, r = ours.reshape(-1, nbytes), ref.reshape(-1, nbytes)
    bad = (o != r).any(dim=1)
    assert not bad.any(), f"{qtype.name}: {int(bad.sum())}/{len(bad)} blocks differ, first {bad.nonzero()[0].item()}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("shape", [(160, 1024), (12, 256)])
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_synthetic_matches_ggml(qtype: GGMLType, with_imatrix: bool, shape: tuple[int, int]) -> None:
    require_libggml()
    w = synthetic(*shape)
    im = imatrix(shape[1]) if with_imatrix else None
    assert_same_blocks(quantize(w, qtype, im), ggml_quantize(w, qtype, im), qtype)


@pytest.mark.llamacpp
def test_q8_0_roundf_near_ties() -> None:
    # amax 127 gives d = 1 and id = 1, so x*id is x: exact halves round away from zero (roundf),
    # and 0.49999997 must round to 0 (floor(|v| + 0.5) would give 1).
    require_libggml()
    below = float(torch.tensor(0.5).nextafter(torch.tensor(0.0)))
    vals = [127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, below, -below, 126.5, -126.5, 3.4999998, 0.0, -0.0]
    row = torch.tensor(vals + [float(i) + 0.5 for i in range(32 - len(vals))])
    w = torch.stack([row, row * 0.37, row * 1e-3, row.flip(0)])
    assert_same_blocks(quantize(w, GGMLType.Q8_0), ggml_quantize(w, GGMLType.Q8_0), GGMLType.Q8_0)


@pytest.mark.demo
@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.0.attn_q.weight"])
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
def test_real_demo_tensors_match_ggml(request: pytest.FixtureRequest, name: str, with_imatrix: bool) -> None:
    require_libggml()
    w = bf16_weight(request.config, name, max_rows=96)
    im = imatrix(w.shape[1]) if with_imatrix else None
    tested = 0
    for qtype in QUANT_TYPES:
        if w.shape[1] % BLOCK[qtype][0]:
            continue  # attn_q rows of 640 cannot be K-quants
        assert_same_blocks(quantize(w, qtype, im), ggml_quantize(w, qtype, im), qtype)
        tested += 1
    assert tested >= 5


def test_bf16_source_is_a_bit_copy() -> None:
    w = synthetic(4, 64).to(torch.bfloat16)
    assert torch.equal(quantize(w, GGMLType.BF16).view(torch.bfloat16), w)


def test_row_size_errors() -> None:
    assert row_bytes(GGMLType.Q6_K, 512) == 2 * 210
    with pytest.raises(GemmaQuantError, match="640 .* Q6_K block of 256"):
        row_bytes(GGMLType.Q6_K, 640)
    with pytest.raises(GemmaQuantError, match="imatrix has 3 values"):
        quantize(torch.zeros(2, 256), GGMLType.Q4_K, torch.ones(3))
