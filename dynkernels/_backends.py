"""Backend choice shared by every public op.

Every op takes ``backend=None`` (auto) or one of :data:`BACKENDS`. Auto takes,
for the tensor's device, the first usable entry of the op's order in the
registry (``_registry.py``): by default on CPU the C++ kernels, else the
reference; on CUDA the CUDA kernels, then Triton, then the reference.
"""

from __future__ import annotations

import torch

from ._extension import (
    BackendUnavailableError,
    has_cuda_kernels,
    has_extension,
    require_cuda_kernels,
    require_extension,
)
from ._registry import BACKENDS, op_spec
from ._triton import family_error, triton_device_error


def backend_error(backend: str, device_type: str, family: str | None = None) -> str | None:
    """Why `backend` cannot run tensors of `device_type` here (for `family`'s
    Triton kernels, when given), or None."""
    if backend in ("reference", "composite"):
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
        return triton_device_error(device_type) or (family_error(family) if family is not None else None)
    raise ValueError(f"unknown backend {backend!r}; expected None or one of {BACKENDS}")


def usable_backends(op: str, device_type: str) -> list[str]:
    """The op's backends (reference included) that run tensors of `device_type` here."""
    spec = op_spec(op)
    return [b for b in spec.backends if backend_error(b, device_type, spec.family) is None]


def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """The backend that runs registered op `op` on `device`; raises with the reason otherwise."""
    spec = op_spec(op)
    device_type = device.type
    if backend is None:
        for candidate in spec.auto_order(device_type):
            if backend_error(candidate, device_type, spec.family) is None:
                return candidate
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected None or one of {BACKENDS}")
    if backend not in spec.backends:
        raise ValueError(f"{op}: backend {backend!r} is not implemented for this op; it has {spec.backends}")
    reason = backend_error(backend, device_type, spec.family)
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


def op_backend(backend: str | None, op: str) -> str | None:
    """The backend a module passes to one op: the module's, where the op has
    it, else auto (a module set to "triton" still runs ball query in C++)."""
    if backend is None or backend in op_spec(op).backends:
        return backend
    return None


def check_module_backend(backend: str | None, *ops: str) -> None:
    """At a module's construction: None, or a backend at least one of the ops
    it calls has (each op then gets it through :func:`op_backend`)."""
    names = sorted({b for op in ops for b in op_spec(op).backends})
    if backend is not None and backend not in names:
        raise ValueError(f"backend must be None or one of {names}, got {backend!r}")
