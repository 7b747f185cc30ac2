"""Backend choice shared by every public op.

Every op takes ``backend=None`` (auto) or one of :data:`BACKENDS`. Auto takes,
for the tensor's device, the first usable entry of the op's preference list:
on CPU the C++ kernels, else the reference; on CUDA the CUDA kernels, then
Triton, then the reference.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ._extension import (
    BackendUnavailableError,
    has_cuda_kernels,
    has_extension,
    require_cuda_kernels,
    require_extension,
)

BACKENDS = ("reference", "cpp", "cuda", "triton")
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}


def triton_error(device_type: str) -> str | None:
    """Why Triton kernels cannot run on this device type, or None if they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (`pip install triton`)"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before importing triton"
    return f"Triton kernels do not support device type {device_type!r}"


def backend_error(backend: str, device_type: str) -> str | None:
    """Why `backend` cannot run tensors of `device_type` here, or None."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if device_type != "cpu":
            return f"backend 'cpp' runs CPU tensors, got {device_type} tensors (use 'cuda' or 'triton')"
        return None if has_extension() else "the C++ extension is not built"
    if backend == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' runs CUDA tensors, got {device_type} tensors (use 'cpp')"
        return None if has_cuda_kernels() else "dynkernels._C was built without CUDA kernels"
    if backend == "triton":
        from .ops._triton_registry import triton_ops_error

        return triton_error(device_type) or triton_ops_error()
    raise ValueError(f"unknown backend {backend!r}; expected None or one of {BACKENDS}")


def usable_backends(device_type: str, supported: tuple[str, ...] = BACKENDS) -> list[str]:
    return [b for b in supported if backend_error(b, device_type) is None]


def resolve(op: str, device: torch.device, backend: str | None, supported: tuple[str, ...]) -> str:
    """The backend that runs `op` on `device`; raises with the reason otherwise."""
    device_type = device.type
    if backend is None:
        for candidate in AUTO_ORDER.get(device_type, ("reference",)):
            if candidate in supported and backend_error(candidate, device_type) is None:
                return candidate
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected None or one of {BACKENDS}")
    if backend not in supported:
        raise ValueError(f"{op}: backend {backend!r} is not implemented for this op; it has {supported}")
    reason = backend_error(backend, device_type)
    if reason is None:
        return backend
    if backend == "cpp":
        if device_type != "cpu":
            raise ValueError(f"{op}: {reason}")
        require_extension(f"{op}(backend='cpp')")
    if backend == "cuda":
        if device_type != "cuda":
            raise ValueError(f"{op}: {reason}")
        require_cuda_kernels(f"{op}(backend='cuda')")
    raise BackendUnavailableError(f"{op}(backend={backend!r}) is unavailable: {reason}")
