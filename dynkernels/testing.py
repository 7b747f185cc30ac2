"""Input factories shared by the tests, the benchmarks and the main job."""

from __future__ import annotations

import torch


def random_cloud(
    batch: int,
    n: int,
    *,
    kind: str = "uniform",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A (batch, n, 3) point cloud.

    kind: "uniform" (unit cube), "scene" (a 6 x 6 x 3 m room: floor, walls and
    boxes sampled on their surfaces, like an indoor scan), or "grid" (points
    snapped to a coarse grid: many exact duplicates and distance ties).
    """
    g = generator
    if kind == "uniform":
        pts = torch.rand(batch, n, 3, generator=g)
    elif kind == "grid":
        pts = torch.floor(torch.rand(batch, n, 3, generator=g) * 6) / 6
    elif kind == "scene":
        pts = _scene(batch, n, g)
    else:
        raise ValueError(f"kind must be 'uniform', 'scene' or 'grid', got {kind!r}")
    return pts.to(dtype=dtype, device=device)


def _scene(batch: int, n: int, g: torch.Generator | None) -> torch.Tensor:
    size = torch.tensor([6.0, 6.0, 3.0])
    u = torch.rand(batch, n, 3, generator=g)
    surface = torch.randint(0, 6, (batch, n), generator=g)  # floor, 4 walls, boxes
    pts = u * size
    pts[..., 2] = torch.where(surface == 0, 0.0, pts[..., 2])
    pts[..., 0] = torch.where(surface == 1, 0.0, torch.where(surface == 2, 6.0, pts[..., 0]))
    pts[..., 1] = torch.where(surface == 3, 0.0, torch.where(surface == 4, 6.0, pts[..., 1]))
    # boxes: points on the top faces of 8 furniture-sized boxes
    box = torch.randint(0, 8, (batch, n), generator=g).float()
    corner = torch.stack([0.5 + (box % 4) * 1.3, 0.8 + torch.div(box, 4, rounding_mode="floor") * 3.2], -1)
    top = corner + u[..., :2] * 0.9
    height = 0.4 + 0.1 * box
    is_box = surface == 5
    pts[..., 0] = torch.where(is_box, top[..., 0], pts[..., 0])
    pts[..., 1] = torch.where(is_box, top[..., 1], pts[..., 1])
    pts[..., 2] = torch.where(is_box, height, pts[..., 2])
    return pts + 0.005 * torch.randn(batch, n, 3, generator=g)


def sample_centers(xyz: torch.Tensor, m: int) -> torch.Tensor:
    """m centers per cloud: the first m points of a random permutation (B, m, 3)."""
    perm = torch.randperm(xyz.shape[1], device=xyz.device)[:m]
    return xyz[:, perm].contiguous()
