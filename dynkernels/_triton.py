"""Lazy import of the Triton kernels, one family at a time: a missing triton,
or one family's module that fails to import, disables the Triton backend of
that family only, with the reason in the error and in ``dynkernels info``."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

from ._extension import BackendUnavailableError

_MODULES: dict[str, ModuleType] = {}
_ERRORS: dict[str, str] = {}


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


# Looked up once, at import (find_spec does not import triton): resolve() asks
# on every call that considers Triton, and a plain constant keeps
# torch.compile from tracing a cached function (which it warns about).
_TRITON_INSTALLED = _find_triton()


def triton_device_error(device_type: str) -> str | None:
    """Why Triton kernels cannot run on this device type, or None if they can."""
    if not _TRITON_INSTALLED:
        return "triton is not installed (`pip install triton`)"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before importing triton"
    return f"Triton kernels do not support device type {device_type!r}"


def family_error(family: str) -> str | None:
    """Why the family's Triton module cannot be imported, or None (imports it once)."""
    if family in _MODULES:
        return None
    if family not in _ERRORS:
        try:
            _MODULES[family] = importlib.import_module(f"dynkernels.triton_kernels.{family}")
            return None
        except Exception as exc:  # ImportError, or triton failing to initialise
            _ERRORS[family] = (
                f"the {family} Triton kernels could not be imported ({type(exc).__name__}: {exc}); `pip install triton`"
            )
    return _ERRORS[family]


def family_kernels(family: str) -> ModuleType:
    """The family's Triton module (``triton_kernels/<family>.py``)."""
    reason = family_error(family)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return _MODULES[family]
