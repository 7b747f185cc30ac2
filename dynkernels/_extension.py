"""Loading of the compiled extension ``dynkernels._C``.

Importing dynkernels never requires ``_C``: without it the reference and Triton
backends still work, and the ops that need it raise
:class:`BackendUnavailableError` saying how to build it.
"""

from __future__ import annotations

import importlib
import os

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the dynkernels checkout, "
    "after torch is installed (unset DYNKERNELS_NO_EXTENSION)"
)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this installation or device cannot run."""


def _load():
    if os.environ.get("DYNKERNELS_DISABLE_EXTENSION", "0") == "1":
        return None, "disabled by DYNKERNELS_DISABLE_EXTENSION=1"
    try:
        module = importlib.import_module("dynkernels._C")
    except ImportError as exc:
        return None, f"dynkernels._C is not importable ({exc})"
    built = module.built_torch_version()
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        raise ImportError(
            f"dynkernels._C was built against torch {built}, but torch {torch.__version__} is running; "
            f"its kernels are not ABI-safe with this torch. Rebuild: {BUILD_HINT}."
        )
    return module, None


_C, LOAD_ERROR = _load()


def has_extension() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.with_cuda())


def require_extension(what: str) -> None:
    if _C is None:
        raise BackendUnavailableError(
            f"{what} needs the C++ extension, which is unavailable: {LOAD_ERROR}; {BUILD_HINT}."
        )


def require_cuda_kernels(what: str) -> None:
    require_extension(what)
    if not _C.with_cuda():
        raise BackendUnavailableError(
            f"{what} needs CUDA kernels, but dynkernels._C was built without CUDA. Rebuild on a machine with a "
            "CUDA build of torch and CUDA_HOME set (or FORCE_CUDA=1): "
            "`MAX_JOBS=16 pip install --no-build-isolation -e .`."
        )
