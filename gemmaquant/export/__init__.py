"""Writers of quantized outputs: compressed-tensors safetensors for vLLM (and the shared atomic helper).

    from gemmaquant.export.safetensors_out import write_compressed_tensors
    from gemmaquant.export.atomic import atomic_output
    from gemmaquant.export.guard import check_output      # the one output guard (every writer)

The writer needs torch; `atomic` and `guard` do not, so the GGUF path can use them before torch is imported.
"""

from .atomic import atomic_output
from .guard import check_output

__all__ = ["atomic_output", "check_output", "Report", "config_with_quantization", "quantization_config",
           "write_compressed_tensors"]


def __getattr__(name):
    if name in ("Report", "config_with_quantization", "quantization_config", "write_compressed_tensors"):
        from . import safetensors_out
        return getattr(safetensors_out, name)
    raise AttributeError(name)
