"""Calibration: token batches, layer-by-layer statistics through the built-in forward pass, and the
algorithms that use them (GPTQ, AWQ, SmoothQuant, fp8 static input scales, llama.cpp imatrix).
The algorithm names are schemes.ALGORITHMS."""

from .pipeline import CalibResult, calibrate

__all__ = ["CalibResult", "calibrate"]
