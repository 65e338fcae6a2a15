"""GGUF export for llama.cpp: files byte-identical to convert_hf_to_gguf.py (bf16) + llama-quantize.

    plan_types(config, preset, has_imatrix) -> [TensorPlan]   which GGML type each tensor gets, and why
    write_gguf(ckpt, preset, out_path, imatrix=..., imatrix_meta=..., force=...) -> Report
    read_imatrix(path) -> Imatrix / write_imatrix(...)        llama.cpp importance-matrix files

Layout: plan (llama-quantize's type choice; its per-preset rule table in preset_rules), metadata
and vocab (the key/value list), header (the header process), workers (parallel quantization), writer
(streaming write + read-back check). Names and imatrix files are read in formats/gguf/.
See docs/gguf-gemma.md for the rules reproduced here.
"""

from .plan import TensorPlan, fallback_count, gguf_schemes, plan_types, preset
from .preset_rules import use_more_bits

__all__ = ["TensorPlan", "fallback_count", "gguf_schemes", "plan_types", "preset", "use_more_bits",
           "write_gguf", "Report", "read_imatrix", "write_imatrix", "Imatrix"]


def __getattr__(name):  # the writer pulls in gguf/torch quantizers: import it on first use
    if name in ("write_gguf", "Report"):
        from . import writer
        return getattr(writer, name)
    if name in ("read_imatrix", "write_imatrix", "Imatrix"):
        from ...formats.gguf import imatrix
        return getattr(imatrix, name)
    raise AttributeError(name)
