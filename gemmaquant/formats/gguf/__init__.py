"""GGUF files on disk: the one reader (whole, or header only for `inspect`), the Hugging Face <-> GGUF
tensor names of Gemma, and llama.cpp's importance-matrix files. No torch at import."""

from .reader import ArrayValue, GGUFFile, GGUFHeader, TensorInfo, read_gguf_header

__all__ = ["ArrayValue", "GGUFFile", "GGUFHeader", "TensorInfo", "read_gguf_header"]
