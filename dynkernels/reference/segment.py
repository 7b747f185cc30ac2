"""The segment / scatter substrate's references: torch's own index_add_ and
scatter_reduce (include_self=False), with the substrate's rule for indices
outside [0, S): the row belongs to no segment and adds nothing."""

from __future__ import annotations

import torch

__all__ = ["scatter_add", "scatter_reduce", "segment_reduce"]


def _bounded(index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """index with every entry outside [0, S) sent to the extra segment S."""
    index = index.long()
    return torch.where((index >= 0) & (index < num_segments), index, num_segments)


def scatter_add(src: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """out[index[i]] += src[i], out (S, *src.shape[1:]), by torch.index_add_."""
    out = src.new_zeros((num_segments + 1, *src.shape[1:]))
    return out.index_add(0, _bounded(index, num_segments), src)[:num_segments]


def scatter_reduce(src: torch.Tensor, index: torch.Tensor, num_segments: int, reduce: str) -> torch.Tensor:
    """out[s] = sum / mean / max of the rows with index s, 0 for an empty s,
    by torch.scatter_reduce(include_self=False) on zeros."""
    name = {"sum": "sum", "mean": "mean", "max": "amax"}[reduce]
    flat = src.reshape(src.shape[0], -1)
    target = _bounded(index, num_segments)[:, None].expand_as(flat)
    out = flat.new_zeros((num_segments + 1, flat.shape[1]))
    out = out.scatter_reduce(0, target, flat, name, include_self=False)
    return out[:num_segments].reshape(num_segments, *src.shape[1:])


def segment_reduce(src: torch.Tensor, offsets: torch.Tensor, reduce: str) -> torch.Tensor:
    """The sorted form: segment s is rows offsets[s] .. offsets[s + 1] - 1 of
    src; rows past offsets[-1] belong to none. Written as a scatter over each
    row's segment number."""
    rows = torch.arange(src.shape[0], device=src.device)
    num_segments = offsets.numel() - 1
    segment = torch.searchsorted(offsets[1:], rows, right=True)
    segment = torch.where(rows >= offsets[0], segment, num_segments)  # rows before the first segment
    return scatter_reduce(src, segment, num_segments, reduce)
