"""Neighbour ops for point-cloud backbones: k nearest neighbours, and the
three-nearest-neighbour interpolation of PointNet++ feature propagation.

Layout as in mmcv: xyz channel-last ``(B, N, 3)``, features channel-first
``(B, C, N)``. Distances are computed as in :mod:`dynkernels.ops.pointops`
(fp32 for half inputs, fp64 for fp64), so indices equal the reference's.
"""

from __future__ import annotations

import torch

from .. import reference
from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from ._validation import (
    check_floating,
    check_index,
    check_index_range,
    check_int,
    check_points,
    check_same_batch,
    check_same_device,
    check_tensor,
)
from .pointops import _kernel_points, grouping_operation

__all__ = ["knn", "three_interpolate", "three_nn"]

FAMILY = "pointops"
_NATIVE = ("reference", "cpp", "cuda")
register_op("knn", FAMILY, _NATIVE, reference=reference.knn)
register_op("three_nn", FAMILY, _NATIVE, reference=reference.three_nn)
register_op("three_interpolate", FAMILY, _NATIVE, reference=reference.three_interpolate, differentiable=_NATIVE)


def _check_pair(xyz_name: str, xyz: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    check_points(xyz_name, xyz)
    check_points(other_name, other)
    check_same_device(**{xyz_name: xyz, other_name: other})
    check_same_batch(**{xyz_name: xyz, other_name: other})
    if xyz.dtype != other.dtype:
        raise TypeError(f"{xyz_name} and {other_name} must share a dtype, got {xyz.dtype} and {other.dtype}")


def knn(
    xyz: torch.Tensor, centers: torch.Tensor, k: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest points of every center, sorted.

    Args:
        xyz: ``(B, N, 3)`` points; centers: ``(B, M, 3)`` queries, same dtype
            (float16/bfloat16/float32/float64) and device.
        k: neighbours per center, ``1 <= k <= N``.
        backend: None (auto), "reference", "cpp" or "cuda".

    Returns:
        ``(dist2, idx)``: ``(B, M, k)`` squared distances (float32, float64 for
        float64 points) ascending, and their int64 indices into N.

    Semantics: d2 as in :func:`dynkernels.ops.ball_query`; ties go to the lower
    index; a NaN distance ranks after every number, +inf included. No gradient
    flows (recompute ``d2`` from the indices if you need one). Deterministic.
    Differences from mmcv's ``knn``: mmcv returns int32 ``(B, k, M)``
    (transposed), no distances, and needs k < 100.

    Example:
        >>> d2, idx = knn(torch.rand(2, 500, 3), torch.rand(2, 7, 3), 16)   # (2, 7, 16) each
    """
    _check_pair("xyz", xyz, "centers", centers)
    k = check_int("k", k, 1, max(1, xyz.shape[1]))
    if xyz.shape[1] == 0:
        raise ValueError("knn needs at least one point per cloud, got N=0")
    chosen = resolve("knn", xyz.device, backend)
    if chosen == "reference":
        dist, idx = reference.knn(xyz, centers, k)
        return dist.detach(), idx
    dist, idx = torch.ops.dynkernels.knn(_kernel_points(xyz), _kernel_points(centers), k)
    return dist.detach(), idx


def three_nn(
    target: torch.Tensor, source: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The three nearest source points of every target point (mmcv's ``three_nn``).

    Args:
        target: ``(B, n, 3)`` points to interpolate at; source: ``(B, m, 3)``
            points that carry features, ``m >= 1``; same dtype and device.
        backend: None (auto), "reference", "cpp" or "cuda".

    Returns:
        ``(dist, idx)``, each ``(B, n, 3)``: Euclidean distances (the square
        root of d2, as mmcv; float32, float64 for float64 points) ascending,
        and int64 indices into m. No gradient flows, as in mmcv.

    Semantics: :func:`knn` with k = 3, so ties go to the lower index. With
    m < 3 the missing slots hold index 0 and distance +inf, as mmcv's kernel
    does, so inverse-distance weights give them 0.
    """
    _check_pair("target", target, "source", source)
    if source.shape[1] == 0:
        raise ValueError("three_nn needs at least one source point per cloud, got m=0")
    chosen = resolve("three_nn", target.device, backend)
    if chosen == "reference":
        dist, idx = reference.three_nn(target, source)
        return dist.detach(), idx
    k = min(3, source.shape[1])
    d2, idx = torch.ops.dynkernels.knn(_kernel_points(source), _kernel_points(target), k)
    dist = d2.detach().sqrt()
    if k < 3:
        batch, n = target.shape[:2]
        dist = torch.cat([dist, dist.new_full((batch, n, 3 - k), float("inf"))], dim=-1)
        idx = torch.cat([idx, idx.new_zeros((batch, n, 3 - k))], dim=-1)
    return dist, idx


def three_interpolate(
    features: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    *,
    deterministic: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted sum of three neighbours' features (mmcv's ``three_interpolate``).

    Args:
        features: ``(B, C, m)`` float16/bfloat16/float32/float64.
        idx: ``(B, n, 3)`` int32/int64 indices in ``[0, m)``, e.g. from :func:`three_nn`.
        weight: ``(B, n, 3)`` in features' dtype, e.g. ``1/(dist+1e-8)`` normalised.
        deterministic: for the CUDA backward, sum gradients in a fixed order
            (sorted segments) instead of atomics; None follows
            ``torch.are_deterministic_algorithms_enabled()``. CPU is always deterministic.
        backend: None (auto), "reference", "cpp" or "cuda".

    Returns:
        ``(B, C, n)``: ``out[b,c,i] = (w0*f[idx0] + w1*f[idx1]) + w2*f[idx2]``.
        Gradients flow to features and to weight (mmcv gives none to weight);
        pass a detached weight for mmcv's behaviour.
    """
    check_tensor("features", features)
    check_floating("features", features)
    if features.dim() != 3:
        raise ValueError(f"features must have shape (B, C, m), got {tuple(features.shape)}")
    check_index("idx", idx, 3, "(B, n, 3)")
    check_tensor("weight", weight)
    if idx.shape[-1] != 3 or weight.shape != idx.shape:
        raise ValueError(
            f"idx and weight must both have shape (B, n, 3), got {tuple(idx.shape)} and {tuple(weight.shape)}"
        )
    if weight.dtype != features.dtype:
        raise TypeError(f"weight must have features' dtype {features.dtype}, got {weight.dtype}")
    check_same_device(features=features, idx=idx, weight=weight)
    check_same_batch(features=features, idx=idx)
    chosen = resolve("three_interpolate", features.device, backend)
    check_index_range("idx", idx, features.shape[2], lowest=0)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if chosen == "reference":
        return reference.three_interpolate(features, idx, weight)
    return torch.ops.dynkernels.three_interpolate(features, idx, weight, bool(deterministic))


# ---- torch.library registrations -------------------------------------------


def _interp_setup_context(ctx, inputs, output):
    features, idx, weight, deterministic = inputs
    ctx.save_for_backward(features, idx, weight)
    ctx.deterministic = deterministic


def _interp_backward(ctx, grad):
    features, idx, weight = ctx.saved_tensors
    grad_features = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_features = torch.ops.dynkernels.three_interpolate_backward(
            grad, idx, weight, features.shape[2], ctx.deterministic
        )
    if ctx.needs_input_grad[2]:
        grouped = grouping_operation(features, idx, deterministic=ctx.deterministic)  # (B, C, n, 3)
        grad_weight = (grouped * grad.unsqueeze(-1)).sum(dim=1)
    return grad_features, None, grad_weight, None


if has_extension():

    @torch.library.register_fake("dynkernels::knn")
    def _(xyz, centers, k):
        dtype = torch.float64 if xyz.dtype == torch.float64 else torch.float32
        shape = (xyz.shape[0], centers.shape[1], k)
        return xyz.new_empty(shape, dtype=dtype), xyz.new_empty(shape, dtype=torch.int64)

    @torch.library.register_fake("dynkernels::three_interpolate")
    def _(features, idx, weight, deterministic):
        return features.new_empty((features.shape[0], features.shape[1], idx.shape[1]))

    @torch.library.register_fake("dynkernels::three_interpolate_backward")
    def _(grad_out, idx, weight, num_points, deterministic):
        return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], num_points))

    torch.library.register_autograd(
        "dynkernels::three_interpolate", _interp_backward, setup_context=_interp_setup_context
    )
