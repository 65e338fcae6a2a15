"""Writers of quantized outputs: compressed-tensors safetensors for vLLM (and the shared atomic helper).

    from gemmaquant.export.safetensors_out import write_compressed_tensors
    from gemmaquant.export.atomic import atomic_output, check_output

The writer needs torch; `atomic` does not, so the GGUF path can use it before torch is imported.
"""

from .atomic import atomic_output, check_output

__all__ = ["atomic_output", "check_output", "Report", "config_with_quantization", "quantization_config",
           "write_compressed_tensors"]


def __getattr__(name):
    if name in ("Report", "config_with_quantization", "quantization_config", "write_compressed_tensors"):
        from . import safetensors_out
        return getattr(safetensors_out, name)
    raise AttributeError(name)
