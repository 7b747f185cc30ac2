"""Point-cloud sampling and grouping ops (PointNet++ / Pointformer / mmcv layout).

xyz is channel-last ``(B, N, 3)``, features channel-first ``(B, C, N)``, as in
mmcv and mmdet3d, so that their users can swap these in. Every op takes
``backend=None`` (auto) or ``"reference"``, ``"cpp"``, ``"cuda"`` (and
``"triton"`` for the gathers); see :mod:`dynkernels._backends`.
"""

from __future__ import annotations

import math

import torch

from .. import reference
from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ._registration import register_kernel_pairs
from ._validation import (
    check_floating,
    check_index,
    check_index_range,
    check_int,
    check_points,
    check_real,
    check_same_batch,
    check_same_device,
    check_tensor,
)

__all__ = ["ball_query", "furthest_point_sample", "gather_points", "grouping_operation"]

FAMILY = "pointops"
_GATHERS = ("reference", "cpp", "cuda", "triton")
register_op("furthest_point_sample", FAMILY, ("reference", "cpp", "cuda"), reference=reference.furthest_point_sample)
register_op("ball_query", FAMILY, ("reference", "cpp", "cuda"), reference=reference.ball_query)
register_op("grouping_operation", FAMILY, _GATHERS, reference=reference.grouping_operation, differentiable=_GATHERS)
register_op("gather_points", FAMILY, _GATHERS, reference=reference.gather_points, differentiable=_GATHERS)

_HALF_TYPES = (torch.float16, torch.bfloat16)


def _kernel_points(t: torch.Tensor) -> torch.Tensor:
    """CPU kernels compute half-type distances in fp32 by upcasting first (the
    CUDA kernels upcast per element as they load)."""
    if t.device.type == "cpu" and t.dtype in _HALF_TYPES:
        return t.float()
    return t


def furthest_point_sample(
    xyz: torch.Tensor, num_points: int, *, start_index: int = 0, backend: str | None = None
) -> torch.Tensor:
    """Exact farthest point sampling (D-FPS), as in PointNet++ and mmcv.

    Args:
        xyz: ``(B, N, 3)`` float16/bfloat16/float32/float64 points, any strides.
        num_points: M, the number of samples, ``0 <= M <= N``.
        start_index: the first sample of every cloud, ``0 <= start_index < N``.
        backend: None (auto), "reference", "cpp" or "cuda".

    Returns:
        ``(B, M)`` int64 indices into N.

    Semantics: each step takes the point whose squared distance to the samples
    so far is largest, squared distances in fp32 (fp64 for fp64 input) as
    ``((dx*dx + dy*dy) + dz*dz)``; ties go to the lowest index; a sampled point
    is never taken again, so with duplicates or ``M == N`` the output has no
    repeats. A point with a NaN coordinate never becomes closer to anything
    (its distances compare false), so it is sampled as soon as the ordering
    reaches +inf. Deterministic on every backend.

    Differences from mmcv: mmcv returns int32, starts its distances at 1e10
    (coordinates more than 1e5 apart are clamped; here they start at +inf),
    breaks ties by a bit-reversed thread order, and repeats indices once the
    distinct points run out.

    Example:
        >>> xyz = torch.rand(2, 1000, 3)
        >>> idx = furthest_point_sample(xyz, 64)              # (2, 64) int64
        >>> centers = torch.gather(xyz, 1, idx[..., None].expand(-1, -1, 3))
    """
    check_points("xyz", xyz)
    n = xyz.shape[1]
    num_points = check_int("num_points", num_points, 0, n)
    start_index = check_int("start_index", start_index, 0, max(n - 1, 0))
    chosen = resolve("furthest_point_sample", xyz.device, backend)
    if chosen == "reference":
        return reference.furthest_point_sample(xyz, num_points, start_index)
    return torch.ops.dynkernels.furthest_point_sample(_kernel_points(xyz), num_points, start_index)


def ball_query(
    xyz: torch.Tensor,
    centers: torch.Tensor,
    radius: float,
    num_samples: int,
    *,
    min_radius: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Ball query with mmcv semantics, and -1 for empty balls.

    Args:
        xyz: ``(B, N, 3)`` points; centers: ``(B, M, 3)`` query centers, same
            dtype and device (float16/bfloat16/float32/float64).
        radius: outer radius, ``> 0``; min_radius: inner radius, ``0 <= min_radius < radius``.
        num_samples: ns, the neighbours kept per center, ``>= 1``.
        backend: None (auto), "reference", "cpp" or "cuda".

    Returns:
        ``(B, M, ns)`` int64 indices into N.

    Semantics: point n is a neighbour of center m when ``d2 == 0`` or
    ``min_radius^2 <= d2 < radius^2`` (strict upper bound), with d2 as in
    :func:`furthest_point_sample` and the radii squared in the same precision.
    The first ns neighbours in index order are kept; a row with fewer is padded
    with its first neighbour; a center with none gets a row of -1 (mmcv gives a
    row of 0, i.e. silently point 0). :func:`grouping_operation` reads -1 as a
    zero feature. Deterministic.
    """
    check_points("xyz", xyz)
    check_points("centers", centers)
    check_same_device(xyz=xyz, centers=centers)
    check_same_batch(xyz=xyz, centers=centers)
    if xyz.dtype != centers.dtype:
        raise TypeError(f"xyz and centers must share a dtype, got {xyz.dtype} and {centers.dtype}")
    radius = check_real("radius", radius)
    min_radius = check_real("min_radius", min_radius)
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    if not 0 <= min_radius < radius:
        raise ValueError(f"min_radius must be in [0, radius={radius}), got {min_radius}")
    num_samples = check_int("num_samples", num_samples, 1)
    chosen = resolve("ball_query", xyz.device, backend)
    if chosen == "reference":
        return reference.ball_query(xyz, centers, radius, num_samples, min_radius)
    return torch.ops.dynkernels.ball_query(
        _kernel_points(xyz), _kernel_points(centers), min_radius, radius, num_samples
    )


def grouping_operation(
    features: torch.Tensor, idx: torch.Tensor, *, deterministic: bool | None = None, backend: str | None = None
) -> torch.Tensor:
    """Group features by neighbour indices: ``out[b, c, m, s] = features[b, c, idx[b, m, s]]``.

    Args:
        features: ``(B, C, N)`` float16/bfloat16/float32/float64, any strides.
        idx: ``(B, M, ns)`` int32 or int64 in ``[-1, N)``, e.g. from :func:`ball_query`.
        deterministic: for the CUDA/Triton backward, sum gradients in a fixed
            order (sorted segments, no atomics) instead of with atomics. None
            follows ``torch.are_deterministic_algorithms_enabled()``. The CPU
            backward is always deterministic.
        backend: None (auto), "reference", "cpp", "cuda" or "triton".

    Returns:
        ``(B, C, M, ns)`` in features' dtype. Index -1 reads a zero feature and
        receives no gradient; gradients flow to ``features`` only. Indices
        outside ``[-1, N)`` raise IndexError on CPU and trip a device assert on
        CUDA.
    """
    check_index("idx", idx, 3, "(B, M, ns)")
    return _gather("grouping_operation", features, idx, deterministic, backend)


def gather_points(
    features: torch.Tensor, idx: torch.Tensor, *, deterministic: bool | None = None, backend: str | None = None
) -> torch.Tensor:
    """Gather features at point indices: ``out[b, c, m] = features[b, c, idx[b, m]]``.

    Args and semantics as :func:`grouping_operation`, with idx ``(B, M)`` and
    the result ``(B, C, M)``.
    """
    check_index("idx", idx, 2, "(B, M)")
    return _gather("gather_points", features, idx, deterministic, backend)


def _gather(op: str, features: torch.Tensor, idx: torch.Tensor, deterministic, backend) -> torch.Tensor:
    check_tensor("features", features)
    if features.dim() != 3:
        raise ValueError(f"features must have shape (B, C, N), got {tuple(features.shape)}")
    check_floating("features", features)
    check_same_device(features=features, idx=idx)
    check_same_batch(features=features, idx=idx)
    chosen = resolve(op, features.device, backend)
    if chosen != "cpp":  # the C++ kernel checks ranges itself
        check_index_range("idx", idx, features.shape[2])
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if chosen == "reference":
        return reference.gather_points(features, idx)
    batch, channels = features.shape[:2]
    flat = idx.reshape(batch, math.prod(idx.shape[1:]))
    if chosen == "triton":
        out = torch.ops.dynkernels.gather_features_triton(features, flat, bool(deterministic))
    else:
        out = torch.ops.dynkernels.gather_features(features, flat, bool(deterministic))
    return out.view(batch, channels, *idx.shape[1:])


# ---- torch.library registrations: fake kernels and autograd ----------------


def _gather_setup_context(ctx, inputs, output):
    features, idx, deterministic = inputs
    ctx.save_for_backward(idx)
    ctx.num_points = features.shape[2]
    ctx.deterministic = deterministic


def _fake_gather(features, idx, deterministic):
    return features.new_empty((features.shape[0], features.shape[1], idx.shape[1]))


def _fake_scatter(grad_out, idx, num_points, deterministic):
    return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], num_points))


def _gather_backward(ctx, backward_op, grad):
    (idx,) = ctx.saved_tensors
    return backward_op(grad, idx, ctx.num_points, ctx.deterministic), None, None


def _scatter_setup_context(ctx, inputs, output):
    _, idx, _, deterministic = inputs
    ctx.save_for_backward(idx)
    ctx.deterministic = deterministic


def _scatter_backward(ctx, forward_op, grad):
    """The backward of the backward is the forward: double backward works."""
    (idx,) = ctx.saved_tensors
    return forward_op(grad, idx, ctx.deterministic), None, None, None


if has_extension():

    @torch.library.register_fake("dynkernels::furthest_point_sample")
    def _(xyz, num_points, start_index):
        return xyz.new_empty((xyz.shape[0], num_points), dtype=torch.int64)

    @torch.library.register_fake("dynkernels::ball_query")
    def _(xyz, centers, min_radius, radius, num_samples):
        return xyz.new_empty((xyz.shape[0], centers.shape[1], num_samples), dtype=torch.int64)


# Opaque custom ops rather than torch.library.triton_op: triton_op is traced
# into by torch.compile, which cannot run under TRITON_INTERPRET=1 (torch
# 2.13), so its compile path could never be tested off-GPU. The kernels are
# imported on first use (dynkernels._triton).


@torch.library.custom_op("dynkernels::gather_features_triton", mutates_args=())
def _gather_features_triton(features: torch.Tensor, idx: torch.Tensor, deterministic: bool) -> torch.Tensor:
    return family_kernels(FAMILY).gather_features_fwd(features, idx)


@torch.library.custom_op("dynkernels::gather_features_backward_triton", mutates_args=())
def _gather_features_backward_triton(
    grad_out: torch.Tensor, idx: torch.Tensor, num_points: int, deterministic: bool
) -> torch.Tensor:
    return family_kernels(FAMILY).gather_features_bwd(grad_out, idx, num_points, deterministic)


register_kernel_pairs(
    ([("dynkernels::gather_features", "dynkernels::gather_features_backward")] if has_extension() else [])
    + [("dynkernels::gather_features_triton", "dynkernels::gather_features_backward_triton")],
    fake=_fake_gather,
    fake_backward=_fake_scatter,
    setup_context=_gather_setup_context,
    backward=_gather_backward,
    double_backward=(_scatter_setup_context, _scatter_backward),
)
