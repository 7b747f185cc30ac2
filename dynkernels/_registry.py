"""The op registry: every public op is declared once, in its family's ops
module, with its backends, which of them have gradients, and its reference.

``resolve()`` (backend choice), the nn modules (``op_backend``), the tests'
backend axes (``tests/conftest.py``), the bench cases and ``dynkernels info``
all read it, so an op's backend list is written in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

BACKENDS = ("reference", "cpp", "cuda", "triton", "composite")
# Which device types each backend takes: the C++ kernels CPU tensors, the
# CUDA kernels CUDA tensors, Triton CUDA tensors (and CPU ones under its
# interpreter), the reference and composites any. A "composite" is a fast
# algorithm written in PyTorch ops (no kernel of its own; autograd gives its
# gradients where it states none), held to the reference like a kernel: the
# training-time losses (ISDA's) are composites over the shared substrate.
DEVICE_TYPES = {
    "reference": ("cpu", "cuda"),
    "cpp": ("cpu",),
    "cuda": ("cuda",),
    "triton": ("cpu", "cuda"),
    "composite": ("cpu", "cuda"),
}
# Auto's order per device type when an op states none: the native kernels
# first; Triton on CPU only when asked for (the interpreter is for tests).
DEFAULT_AUTO = {"cpu": ("cpp", "composite", "reference"), "cuda": ("cuda", "triton", "composite", "reference")}


@dataclass(frozen=True)
class OpSpec:
    """One public op. backends: those implemented ("reference" always is);
    differentiable: those with a backward (empty for index-valued ops);
    auto: per device type, auto's order (default DEFAULT_AUTO, restricted to
    the op's backends)."""

    name: str
    family: str
    backends: tuple[str, ...]
    reference: Callable
    differentiable: tuple[str, ...] = ()
    auto: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def auto_order(self, device_type: str) -> tuple[str, ...]:
        order = self.auto.get(device_type, DEFAULT_AUTO.get(device_type, ("reference",)))
        return tuple(b for b in order if b in self.backends)

    def kernel_backends(self, device_type: str) -> tuple[str, ...]:
        """The op's non-reference backends that take tensors of this device type."""
        return tuple(b for b in self.backends if b != "reference" and device_type in DEVICE_TYPES[b])


_OPS: dict[str, OpSpec] = {}


def register_op(
    name: str,
    family: str,
    backends: tuple[str, ...],
    *,
    reference: Callable,
    differentiable: tuple[str, ...] = (),
    auto: Mapping[str, tuple[str, ...]] | None = None,
) -> OpSpec:
    """Declare an op (once, at import of its family's ops module)."""
    unknown = set(backends) - set(BACKENDS)
    if unknown or "reference" not in backends:
        raise ValueError(f"{name}: backends must include 'reference' and be among {BACKENDS}, got {backends}")
    if not set(differentiable) <= set(backends):
        raise ValueError(f"{name}: differentiable backends {differentiable} are not all in {backends}")
    if name in _OPS and _OPS[name].family != family:
        raise ValueError(f"op {name!r} is already declared by family {_OPS[name].family!r}")
    spec = OpSpec(name, family, tuple(backends), reference, tuple(differentiable), dict(auto or {}))
    _OPS[name] = spec
    return spec


def op_spec(name: str) -> OpSpec:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"no op {name!r} is registered; known: {sorted(_OPS)}") from None


def registered_ops(family: str | None = None) -> list[OpSpec]:
    """Every declared op (importing dynkernels.ops declares them all), or one family's."""
    from . import ops  # noqa: F401  (the declarations live in the ops modules)

    return [spec for spec in _OPS.values() if family is None or spec.family == family]


def families() -> list[str]:
    return sorted({spec.family for spec in registered_ops()})
