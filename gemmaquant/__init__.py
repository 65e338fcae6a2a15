"""gemmaquant: quantize Gemma 1/2/3 checkpoints for vLLM (compressed-tensors) and llama.cpp (GGUF)."""

__version__ = "0.1.0"
