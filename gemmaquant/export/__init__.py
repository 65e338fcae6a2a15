"""Writers of quantized outputs, and what keeps them from destroying files.

    compressed_tensors  safetensors for vLLM in the compressed-tensors layout (write_compressed_tensors)
    gguf/               GGUF for llama.cpp, byte-identical to convert_hf_to_gguf.py + llama-quantize
    atomic              temp file/dir + rename, never a half-written output (atomic_output)
    guard               the one output guard every writer passes (check_output)
    diskspace           refuse a write the filesystem cannot hold, before any work
    model_card          README.md cards that say how an output was made
    procs               child processes (the GGUF writer's workers) die with their parent

The writers need torch; `atomic` and `guard` do not, so the GGUF path can use them before torch is imported.
"""

from .atomic import atomic_output
from .guard import check_output

__all__ = ["atomic_output", "check_output", "Report", "config_with_quantization", "quantization_config",
           "write_compressed_tensors"]


def __getattr__(name):
    if name in ("Report", "config_with_quantization", "quantization_config", "write_compressed_tensors"):
        from . import compressed_tensors
        return getattr(compressed_tensors, name)
    raise AttributeError(name)
