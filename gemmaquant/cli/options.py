"""Options shared by several commands (`eval`, `compare`), kept apart from cli/app.py so that command
modules can import them without importing the app."""

from __future__ import annotations

from pathlib import Path

from ..errors import GemmaQuantError

COMPILE_HELP = ("Dequantize GGUF and compressed-tensors weights with torch.compile'd kernels (CPU): same bits, faster "
                "dequantization after a compile per type and process (needs a C++ compiler; falls back to the plain "
                "kernels with a warning). Pays off where dequantization dominates, not on a short eval "
                "(figures: benchmarks/RESULTS.md section 6). Also: GEMMAQUANT_COMPILE=1.")

QUANT_COMPILE_HELP = ("GGUF: the quantizers run as native C by default wherever a C compiler exists (built on first use in "
                      "about 2 s, cached; the same bytes, each type's first chunk checked against the plain quantizer; "
                      "GEMMAQUANT_NATIVE=0 turns them off). --compile adds torch.compile'd scale searches as their fallback "
                      "and warns when no compiler is found, and compiles the dequantizers of eval/compare. Also: "
                      "GEMMAQUANT_COMPILE=1.")

TEXT_HELP = ("UTF-8 text to measure on, a regular file (at most its first 32 MiB are used; default: the built-in "
             "evaluation text, five licence documents that share nothing with the calibration text). Outputs "
             "name the text and its sha256.")


def set_compile(flag: bool) -> None:
    """--compile: turn the compiled dequantizers and quantizer searches on (torch is imported only when asked)."""
    if flag:
        from ..numerics import compiling

        compiling.set_enabled(True)


def path_arg(option: str):
    """A typer `parser=` for path options: '' is refused (typer would silently turn it into '.', the
    current directory, which `--out '' --force` then replaced)."""
    def parse(value: str) -> Path:
        if value == "":
            raise GemmaQuantError(f"{option}: the path is empty (give a file or directory name)")
        return Path(value)
    return parse
