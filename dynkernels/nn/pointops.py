"""Modules over the point-cloud ops."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import ball_query, grouping_operation

__all__ = ["QueryAndGroup"]


class QueryAndGroup(nn.Module):
    """Ball query then grouping, as mmcv's ``QueryAndGroup``.

    ``forward(xyz (B, N, 3), centers (B, M, 3), features (B, C, N) or None)``
    returns ``(B, 3 + C, M, ns)`` (``(B, C, M, ns)`` with ``use_xyz=False``):
    the neighbours' coordinates relative to their center (``x_j - x_i``, the
    offsets mmdet3d <= 0.15 and Pointformer use), then their features.
    Neighbour slots of an empty ball (index -1) are all zero, offsets included.
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
        self.radius, self.num_samples, self.min_radius = radius, num_samples, min_radius
        self.use_xyz, self.backend = use_xyz, backend

    def forward(self, xyz: torch.Tensor, centers: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        idx = ball_query(xyz, centers, self.radius, self.num_samples, min_radius=self.min_radius, backend=self.backend)
        parts = []
        if self.use_xyz or features is None:
            grouped = grouping_operation(xyz.transpose(1, 2), idx, backend=self.backend)
            offsets = grouped - centers.transpose(1, 2).unsqueeze(-1)
            parts.append(torch.where(idx.unsqueeze(1) >= 0, offsets, torch.zeros_like(offsets)))
        if features is not None:
            parts.append(grouping_operation(features, idx, backend=self.backend))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def extra_repr(self) -> str:
        return (
            f"radius={self.radius}, num_samples={self.num_samples}, min_radius={self.min_radius}, "
            f"use_xyz={self.use_xyz}, backend={self.backend}"
        )
