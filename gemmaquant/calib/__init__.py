"""Calibration: token batches, layer-by-layer statistics through the built-in forward pass, and the
algorithms that use them (GPTQ, AWQ, SmoothQuant, fp8 static input scales, llama.cpp imatrix)."""

from .pipeline import ALGORITHMS, CalibResult, calibrate

__all__ = ["ALGORITHMS", "CalibResult", "calibrate"]
