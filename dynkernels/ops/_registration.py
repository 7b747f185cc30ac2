"""torch.library plumbing shared by every family: one call registers the
fake kernels and the autograd of a (forward, backward) op pair, for the C++
op and its Triton twin alike (they share signatures)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def register_kernel_pairs(
    pairs: Iterable[tuple[str, str]],
    *,
    fake: Callable,
    fake_backward: Callable,
    setup_context: Callable,
    backward: Callable,
    double_backward: tuple[Callable, Callable] | None = None,
) -> None:
    """For each (forward, backward) pair of qualified op names ("dynkernels::x"):
    register ``fake`` / ``fake_backward`` as their fake kernels and make the
    forward differentiable with ``backward(ctx, backward_op, *grads)``, which
    calls the pair's own backward op. ``setup_context(ctx, inputs, output)`` is
    shared. ``double_backward = (setup_context, fn(ctx, forward_op, grad))``
    also makes the backward op differentiable (a gather's backward is a
    scatter whose backward is the gather)."""
    for forward_name, backward_name in pairs:
        forward_op = _op(forward_name)
        backward_op = _op(backward_name)
        torch.library.register_fake(forward_name)(fake)
        torch.library.register_fake(backward_name)(fake_backward)
        torch.library.register_autograd(forward_name, _bind(backward, backward_op), setup_context=setup_context)
        if double_backward is not None:
            setup_backward, fn = double_backward
            torch.library.register_autograd(backward_name, _bind(fn, forward_op), setup_context=setup_backward)


def _op(qualified: str):
    namespace, name = qualified.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def _bind(fn: Callable, op) -> Callable:
    def autograd_fn(ctx, *grads):
        return fn(ctx, op, *grads)

    return autograd_fn


def dense_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of t's shape: what the kernels write whatever their
    inputs' strides (empty_like would copy a transposed input's strides)."""
    return t.new_empty(t.shape)
