"""What this installation built and which backends run here."""

from __future__ import annotations

import importlib.metadata
import os

import torch

from . import _extension
from ._backends import backend_error
from ._registry import BACKENDS, registered_ops


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict:
    """A dict describing the build (extension, CUDA archs, Triton, torch) and,
    per device type present, each backend's availability (None when usable,
    else the reason)."""
    ext = _extension._C
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "dynkernels": _version("dynkernels"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": {
            "built": ext is not None,
            "error": _extension.LOAD_ERROR,
            "built_against_torch": ext.built_torch_version() if ext is not None else None,
            "cuda_kernels": bool(ext.with_cuda()) if ext is not None else False,
            "cuda_arch_list": (ext.cuda_arch_list() or None) if ext is not None else None,
        },
        "triton": {"version": _version("triton"), "interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"},
        "cpu_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "backends": {dev: {b: backend_error(b, dev) for b in BACKENDS} for dev in devices},
        "ops": {
            spec.name: {
                "family": spec.family,
                "backends": {dev: {b: backend_error(b, dev, spec.family) for b in spec.backends} for dev in devices},
                "auto": {dev: spec.auto_order(dev) for dev in devices},
                "differentiable": spec.differentiable,
            }
            for spec in registered_ops()
        },
    }


def format_info(data: dict | None = None) -> str:
    data = data or info()
    ext = data["extension"]
    lines = [
        f"dynkernels {data['dynkernels']}  torch {data['torch']} (CUDA {data['torch_cuda']})",
        f"extension: {'built against torch ' + ext['built_against_torch'] if ext['built'] else 'missing: ' + ext['error']}",
        f"  CUDA kernels: {ext['cuda_kernels']}  arch list: {ext['cuda_arch_list']}",
        f"triton: {data['triton']['version']}  interpreter: {data['triton']['interpret']}",
        f"CPU threads: {data['cpu_threads']}  GPUs: {', '.join(data['gpus']) or 'none'}",
        "backends:",
    ]
    for dev, table in data["backends"].items():
        for backend, reason in table.items():
            lines.append(f"  {dev:5s} {backend:10s} {'usable' if reason is None else 'no: ' + reason}")
    lines.append("ops (backends usable here per device; * = has gradients):")
    for name, op in data["ops"].items():
        for dev, table in op["backends"].items():
            usable = [b + ("*" if b in op["differentiable"] else "") for b, reason in table.items() if reason is None]
            # the device-wide reasons are in the table above; a family's own import error is shown here
            missing = [
                b + (f" ({reason})" if "Triton kernels could not be imported" in reason else "")
                for b, reason in table.items()
                if reason is not None and dev in _devices_of(b)
            ]
            line = f"  {op['family']:18s} {name:24s} {dev:5s} {', '.join(usable)}"
            lines.append(line + (f"; not here: {'; '.join(missing)}" if missing else ""))
    return "\n".join(lines)


def _devices_of(backend: str) -> tuple[str, ...]:
    from ._registry import DEVICE_TYPES

    return DEVICE_TYPES[backend]
