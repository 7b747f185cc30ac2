"""Reference point-cloud ops in plain PyTorch (mmcv layout).

Distances are computed exactly as the kernels compute them, so indices can be
compared for equality: d2 = ((x - cx)^2 + (y - cy)^2) + (z - cz)^2, elementwise,
in float32 (float64 for float64 inputs; half types are upcast to float32).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ball_query",
    "distance_dtype",
    "furthest_point_sample",
    "gather_points",
    "grouping_operation",
    "knn",
    "squared_distance",
    "three_interpolate",
    "three_nn",
]


def distance_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision distances are computed in for points of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def squared_distance(points: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """((x - cx)^2 + (y - cy)^2) + (z - cz)^2 over the last dim (broadcasting)."""
    dx = points[..., 0] - center[..., 0]
    dy = points[..., 1] - center[..., 1]
    dz = points[..., 2] - center[..., 2]
    return (dx * dx + dy * dy) + dz * dz


def furthest_point_sample(xyz: torch.Tensor, num_points: int, start_index: int = 0) -> torch.Tensor:
    """Exact farthest point sampling; see dynkernels.ops.furthest_point_sample.

    md starts at +inf; each step emits the current sample s, folds its distance
    in with fmin (a NaN distance changes nothing), marks md[s] = -1 so it is
    never taken again, and moves to the first index of the largest md.
    """
    batch, n, _ = xyz.shape
    points = xyz.to(distance_dtype(xyz.dtype))
    out = torch.empty((batch, num_points), dtype=torch.int64, device=xyz.device)
    if num_points == 0 or batch == 0:
        return out
    rows = torch.arange(batch, device=xyz.device)
    md = torch.full((batch, n), float("inf"), dtype=points.dtype, device=xyz.device)
    current = torch.full((batch,), start_index, dtype=torch.int64, device=xyz.device)
    for i in range(num_points):
        out[:, i] = current
        if i + 1 == num_points:
            break
        center = points[rows, current].unsqueeze(1)
        md = torch.fmin(md, squared_distance(points, center))
        md[rows, current] = -1.0
        current = md.argmax(dim=1)  # the first maximum: ties go to the lowest index
    return out


def ball_query(
    xyz: torch.Tensor, centers: torch.Tensor, radius: float, num_samples: int, min_radius: float = 0.0
) -> torch.Tensor:
    """mmcv ball query with -1 rows for empty balls; see dynkernels.ops.ball_query."""
    batch, n, _ = xyz.shape
    m = centers.shape[1]
    dtype = distance_dtype(xyz.dtype)
    points = xyz.to(dtype)
    r = torch.tensor(radius, dtype=dtype)
    r_min = torch.tensor(min_radius, dtype=dtype)
    r2, min_r2 = (r * r).item(), (r_min * r_min).item()
    out = torch.empty((batch, m, num_samples), dtype=torch.int64, device=xyz.device)
    if out.numel() == 0:
        return out
    positions = torch.arange(n, device=xyz.device)
    k = min(num_samples, n)
    chunk = _chunked_rows(m, batch, n)
    for m0 in range(0, m, chunk):
        ctr = centers[:, m0 : m0 + chunk].to(dtype).unsqueeze(2)  # (B, m, 1, 3)
        d2 = squared_distance(points.unsqueeze(1), ctr)  # (B, m, N)
        hit = (d2 == 0) | ((d2 >= min_r2) & (d2 < r2))
        order = torch.where(hit, positions, n)
        rows = torch.full((*order.shape[:2], num_samples), n, dtype=torch.int64, device=xyz.device)
        if k > 0:
            rows[..., :k] = order.topk(k, dim=-1, largest=False, sorted=True).values
        valid = rows < n
        first = torch.where(valid[..., :1], rows[..., :1], -1)
        out[:, m0 : m0 + chunk] = torch.where(valid, rows, first)
    return out


def gather_points(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """features (B, C, N), idx (B, ...) -> (B, C, ...); index -1 reads zero and
    passes no gradient."""
    batch, channels, n = features.shape
    flat = idx.reshape(batch, 1, math.prod(idx.shape[1:]))
    if n == 0:
        out = features.new_zeros((batch, channels, flat.shape[-1]))
    else:
        gathered = features.gather(2, flat.clamp(min=0).to(torch.int64).expand(batch, channels, -1))
        out = torch.where(flat >= 0, gathered, torch.zeros((), dtype=features.dtype, device=features.device))
    return out.reshape(batch, channels, *idx.shape[1:])


def grouping_operation(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """features (B, C, N), idx (B, M, ns) -> (B, C, M, ns)."""
    return gather_points(features, idx)


def _chunked_rows(m: int, batch: int, n: int) -> int:
    """Centers per chunk so that one (B, chunk, N) distance block stays near 16M elements."""
    return max(1, (1 << 24) // max(1, batch * n))


def knn(xyz: torch.Tensor, centers: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest points of each center; see dynkernels.ops.knn.

    A stable ascending sort of d2 per center: ties go to the lower index and
    NaN distances rank after every number (+inf included).
    """
    batch, n, _ = xyz.shape
    m = centers.shape[1]
    dtype = distance_dtype(xyz.dtype)
    points = xyz.to(dtype)
    dist = torch.empty((batch, m, k), dtype=dtype, device=xyz.device)
    idx = torch.empty((batch, m, k), dtype=torch.int64, device=xyz.device)
    if dist.numel() == 0:
        return dist, idx
    chunk = _chunked_rows(m, batch, n)
    for m0 in range(0, m, chunk):
        ctr = centers[:, m0 : m0 + chunk].to(dtype).unsqueeze(2)
        d2 = squared_distance(points.unsqueeze(1), ctr)  # (B, m, N)
        values, order = d2.sort(dim=-1, stable=True)
        dist[:, m0 : m0 + chunk] = values[..., :k]
        idx[:, m0 : m0 + chunk] = order[..., :k]
    return dist, idx


def three_nn(target: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3 nearest source points of each target point, mmcv style: Euclidean
    (square-rooted) distances ascending; with fewer than 3 source points the
    missing slots hold index 0 and distance +inf (so their weight is 0)."""
    batch, n, _ = target.shape
    k = min(3, source.shape[1])
    d2, idx = knn(source, target, k)
    dist = d2.sqrt()
    if k < 3:
        dist = torch.cat([dist, dist.new_full((batch, n, 3 - k), float("inf"))], dim=-1)
        idx = torch.cat([idx, idx.new_zeros((batch, n, 3 - k))], dim=-1)
    return dist, idx


def three_interpolate(features: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[b, c, i] = sum_j weight[b, i, j] * features[b, c, idx[b, i, j]], the
    terms added in j order; features (B, C, m), idx and weight (B, n, 3)."""
    grouped = gather_points(features, idx)  # (B, C, n, 3)
    w = weight.to(features.dtype).unsqueeze(1)
    terms = grouped * w
    return (terms[..., 0] + terms[..., 1]) + terms[..., 2]
