"""int32 bit packing: the spec's worked example, and bit-identity with compressed-tensors' packer."""

from __future__ import annotations

import pytest
import torch

from gemmaquant.numerics.ct.pack import pack_to_int32, unpack_from_int32

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

# Widths that are and are not multiples of a word (8 INT4 or 4 INT8 codes) or of ct's 32-code groups.
SHAPES = [(1, 8), (1, 1), (3, 5), (7, 32), (8, 33), (16, 128), (5, 100), (9, 256), (33, 7), (2, 1000)]


def _codes(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int8)


def test_worked_example_from_the_spec():
    # docs/vllm-formats.md §4: row [1,2,3,7,-8,0,0,0] -> word 0x8880FBA9, element 0 in the low nibble
    packed = pack_to_int32(torch.tensor([[1, 2, 3, 7, -8, 0, 0, 0]]), 4)
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert packed.item() & 0xFFFFFFFF == 0x8880FBA9
    # INT8: four bytes per word, +128 offset, element 0 in bits 0-7
    packed8 = pack_to_int32(torch.tensor([[-128, 0, 127, -1]]), 8)
    assert packed8.item() & 0xFFFFFFFF == 0x7FFF8000


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_matches_compressed_tensors(bits, shape):
    q = _codes(shape, bits, seed=hash(shape) % 1000 + bits)
    ours = pack_to_int32(q, bits)
    theirs = ct_helpers.pack_to_int32(q, bits)
    assert ours.dtype == theirs.dtype == torch.int32
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_from_int32(ours, bits, shape), q)
    assert torch.equal(ct_helpers.unpack_from_int32(ours, bits, torch.tensor(shape)).to(torch.int8), q)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_zero_point_packing_along_dim0_matches_compressed_tensors(bits, shape):
    z = _codes(shape, bits, seed=7 * bits + shape[0])
    ours = pack_to_int32(z, bits, packed_dim=0)
    theirs = ct_helpers.pack_to_int32(z, bits, packed_dim=0)
    assert ours.shape == (-(-shape[0] * bits // 32), shape[1])
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_from_int32(ours, bits, shape, packed_dim=0), z)
    assert torch.equal(ct_helpers.unpack_from_int32(ours, bits, torch.tensor(shape), packed_dim=0).to(torch.int8), z)


def test_out_of_range_codes_and_bad_bits_are_refused():
    with pytest.raises(ValueError, match="range"):
        pack_to_int32(torch.tensor([[8]]), 4)
    with pytest.raises(ValueError, match="range"):
        pack_to_int32(torch.tensor([[-9]]), 4)
    with pytest.raises(ValueError, match="num_bits"):
        pack_to_int32(torch.tensor([[0]]), 3)
    with pytest.raises(ValueError, match="integer"):
        pack_to_int32(torch.tensor([[0.5]]), 4)
