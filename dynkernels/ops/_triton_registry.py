"""Optional import of the Triton kernels: a missing or broken triton disables
only the Triton backend, with the reason kept for error messages."""

from __future__ import annotations

import importlib

try:
    pointops_kernels = importlib.import_module("dynkernels.triton_kernels.pointops")
    pointformer_kernels = importlib.import_module("dynkernels.triton_kernels.pointformer")
    evolving_kernels = importlib.import_module("dynkernels.triton_kernels.evolving")
    isda_kernels = importlib.import_module("dynkernels.triton_kernels.isda")
    _ERROR: str | None = None
except Exception as exc:  # ImportError, or triton failing to initialise
    pointops_kernels = pointformer_kernels = evolving_kernels = isda_kernels = None
    _ERROR = f"the Triton kernels could not be imported ({type(exc).__name__}: {exc}); `pip install triton`"


def triton_ops_error() -> str | None:
    return _ERROR
