"""Writers of quantized outputs: compressed-tensors safetensors for vLLM (and the shared atomic helper)."""

from .atomic import atomic_output, check_output
from .safetensors_out import Report, config_with_quantization, quantization_config, write_compressed_tensors

__all__ = ["atomic_output", "check_output", "Report", "config_with_quantization", "quantization_config",
           "write_compressed_tensors"]
