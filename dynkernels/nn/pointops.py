"""Modules over the point-cloud ops."""

from __future__ import annotations

import torch
from torch import nn

from .._backends import check_module_backend, op_backend
from ..ops import ball_query, grouping_operation
from ..ops._validation import check_finite_real, check_int, check_tensor

__all__ = ["QueryAndGroup"]


class QueryAndGroup(nn.Module):
    """Ball query then grouping, as mmcv's ``QueryAndGroup``.

    ``forward(xyz (B, N, 3), centers (B, M, 3), features (B, C, N) or None)``
    returns ``(B, 3 + C, M, ns)`` (``(B, C, M, ns)`` with ``use_xyz=False``):
    the neighbours' coordinates relative to their center (``x_j - x_i``, the
    offsets mmdet3d <= 0.15 and Pointformer use), then their features.
    Neighbour slots of an empty ball (index -1) are all zero, offsets included.

    backend: passed to each op that has it; the others run on auto (ball
    query has no Triton kernel, so ``backend="triton"`` groups with Triton and
    queries with the C++/CUDA kernel). A name no op has is refused here, at
    construction, as are a radius that is not a positive finite number, a
    min_radius outside [0, radius) and num_samples < 1.
    """

    def __init__(
        self,
        radius: float,
        num_samples: int,
        *,
        min_radius: float = 0.0,
        use_xyz: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        radius, min_radius = check_finite_real("radius", radius), check_finite_real("min_radius", min_radius)
        if radius <= 0 or not 0 <= min_radius < radius:
            raise ValueError(f"need 0 <= min_radius < radius, got min_radius={min_radius}, radius={radius}")
        num_samples = check_int("num_samples", num_samples, 1)
        check_module_backend(backend, "ball_query", "grouping_operation")
        self.radius, self.num_samples, self.min_radius = radius, num_samples, min_radius
        self.use_xyz, self.backend = use_xyz, backend

    def forward(self, xyz: torch.Tensor, centers: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        if features is not None:
            check_tensor("features", features)
            if features.dim() != 3 or features.shape[0] != xyz.shape[0] or features.shape[2] != xyz.shape[1]:
                raise ValueError(
                    f"features must be (B, C, N) = ({xyz.shape[0]}, C, {xyz.shape[1]}) for xyz "
                    f"{tuple(xyz.shape)}, got {tuple(features.shape)}"
                )
        query = op_backend(self.backend, "ball_query")
        group = op_backend(self.backend, "grouping_operation")
        idx = ball_query(xyz, centers, self.radius, self.num_samples, min_radius=self.min_radius, backend=query)
        parts = []
        if self.use_xyz or features is None:
            grouped = grouping_operation(xyz.transpose(1, 2), idx, backend=group)
            offsets = grouped - centers.transpose(1, 2).unsqueeze(-1)
            parts.append(torch.where(idx.unsqueeze(1) >= 0, offsets, torch.zeros_like(offsets)))
        if features is not None:
            parts.append(grouping_operation(features, idx, backend=group))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def extra_repr(self) -> str:
        return (
            f"radius={self.radius}, num_samples={self.num_samples}, min_radius={self.min_radius}, "
            f"use_xyz={self.use_xyz}, backend={self.backend}"
        )
