"""The segment / scatter substrate shared by the families: rows grouped by an
integer key (a class, an expert, a target token, a point), as ISDA's
class-wise moments, token merging, MoE dispatch/combine and the point ops'
gather backwards need them.

Rule for keys and indices: an entry outside ``[0, S)`` (``-1`` by
convention) belongs to no segment. It is dropped, not an error: checking
would read the indices on the host, a sync on GPUs. Callers that take keys
from users (ISDA's labels) check them themselves, once.

* :func:`sort_segments` -- stable sort by key into segments: ``perm``,
  ``offsets``, ``counts``; device-side throughout (no host sync).
* :func:`gather_rows` -- ``src[index]`` with a zero row for dropped entries;
  :func:`segment_ids` -- each sorted row's segment.
* :func:`segment_reduce` -- per segment of sorted rows: sum, mean or max,
  summed in row order (deterministic on every backend).
* :func:`scatter_add` -- ``out[index[i]] += src[i]``: row order on CPU;
  atomics on GPUs unless ``deterministic`` (then sort + segment_reduce).
* :func:`scatter_reduce` -- sum / mean / max by index (sort +
  segment_reduce: deterministic everywhere).

All take ``src`` of shape ``(M, *)`` (the trailing dims are reduced
element-wise), are differentiable in ``src`` (max: the gradient is shared
evenly among tied maxima, as torch's scatter_reduce gives it), and work
under torch.compile. Empty segments give 0. Half types accumulate in float.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import reference
from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ._validation import check_floating, check_same_device, check_tensor

__all__ = [
    "Segments",
    "gather_rows",
    "scatter_add",
    "scatter_reduce",
    "segment_ids",
    "segment_reduce",
    "sort_segments",
]

FAMILY = "segment"
_ALL = ("reference", "cpp", "cuda", "triton")
register_op("segment_reduce", FAMILY, _ALL, reference=reference.segment_reduce, differentiable=_ALL)
register_op("scatter_add", FAMILY, _ALL, reference=reference.scatter_add, differentiable=_ALL)
register_op("scatter_reduce", FAMILY, _ALL, reference=reference.scatter_reduce, differentiable=_ALL)

_REDUCTIONS = ("sum", "mean", "max")


class Segments(NamedTuple):
    """Rows sorted into segments by key. ``perm`` (M,): the positions of the
    kept keys in key order, ties in position order (stable), then the dropped
    positions; segment s is ``perm[offsets[s]:offsets[s + 1]]``; ``offsets``
    (S + 1,) int64, ``offsets[S]`` the number kept; ``counts`` (S,) int64."""

    perm: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor


def _check_keys(name: str, keys: torch.Tensor, length: int | None = None) -> None:
    check_tensor(name, keys)
    if keys.dim() != 1 or keys.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32 or int64 tensor, got {tuple(keys.shape)} {keys.dtype}")
    if length is not None and keys.shape[0] != length:
        raise ValueError(f"{name} must have one entry per row of src ({length}), got {keys.shape[0]}")


def _check_segments(num_segments) -> int:
    if isinstance(num_segments, bool) or not isinstance(num_segments, (int, torch.SymInt)) or num_segments < 0:
        raise ValueError(f"num_segments must be an int >= 0, got {num_segments!r}")
    return num_segments


def _check_reduce(reduce: str) -> str:
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    return reduce


def _check_src(src: torch.Tensor) -> None:
    check_tensor("src", src)
    if src.dim() < 1:
        raise ValueError("src must have at least one dim (rows first)")
    check_floating("src", src)


def sort_segments(keys: torch.Tensor, num_segments: int) -> Segments:
    """Stable sort of keys (M,) into S = num_segments segments (see
    :class:`Segments`); keys outside [0, S) are dropped (placed last)."""
    _check_keys("keys", keys)
    num_segments = _check_segments(num_segments)
    k = keys.long()
    bounded = torch.where((k >= 0) & (k < num_segments), k, num_segments)
    sorted_keys, perm = torch.sort(bounded, stable=True)
    offsets = torch.searchsorted(sorted_keys, torch.arange(num_segments + 1, device=keys.device))
    return Segments(perm, offsets, offsets[1:] - offsets[:-1])


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[i] = src[index[i]], a zero row where index[i] is outside [0, S)
    (S = src.shape[0]). Differentiable in src (torch's index_select)."""
    check_tensor("src", src)
    _check_keys("index", index)
    check_same_device(src=src, index=index)
    rows = src.shape[0]
    k = index.long()
    padded = torch.cat([src, src.new_zeros((1, *src.shape[1:]))])
    return padded.index_select(0, torch.where((k >= 0) & (k < rows), k, rows))


def _rows_of(src: torch.Tensor) -> torch.Tensor:
    return src.reshape(src.shape[0], math.prod(src.shape[1:]))


def segment_reduce(
    src: torch.Tensor, offsets: torch.Tensor, reduce: str = "sum", *, backend: str | None = None
) -> torch.Tensor:
    """Reduce each segment of rows already sorted by segment: segment s is
    rows ``offsets[s] .. offsets[s + 1] - 1`` of src (M, *) (offsets (S + 1,)
    int64, non-decreasing, within [0, M]; :func:`sort_segments` gives them).
    Returns (S, *). reduce: "sum", "mean" or "max" (NaN propagates). Summed in
    row order on every backend: deterministic. On CPU bad offsets raise; on
    GPUs each segment's rows are clamped to [0, M) (no host sync).
    backend: None (auto), "reference", "cpp", "cuda" or "triton"."""
    _check_src(src)
    _check_keys("offsets", offsets)
    if offsets.dtype != torch.int64 or offsets.numel() < 1:
        raise ValueError(f"offsets must be int64 with S + 1 >= 1 entries, got {offsets.dtype} ({offsets.numel()})")
    check_same_device(src=src, offsets=offsets)
    _check_reduce(reduce)
    chosen = resolve("segment_reduce", src.device, backend)
    if chosen == "reference":
        return reference.segment_reduce(src, offsets, reduce)
    return _segment_reduce(chosen, _rows_of(src), offsets, reduce).reshape(offsets.numel() - 1, *src.shape[1:])


def _segment_reduce(chosen: str, rows: torch.Tensor, offsets: torch.Tensor, reduce: str) -> torch.Tensor:
    if chosen == "triton":
        return torch.ops.dynkernels.segment_reduce_triton(rows, offsets, reduce)
    return torch.ops.dynkernels.segment_reduce(rows, offsets, reduce)


def scatter_add(
    src: torch.Tensor,
    index: torch.Tensor,
    num_segments: int,
    *,
    deterministic: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """out (S, *) with out[index[i]] += src[i] (src (M, *), index (M,)
    int32/int64); entries outside [0, S) add nothing. The CPU kernel adds in
    row order. On GPUs deterministic=True sorts by index and sums each segment
    in row order; False uses atomics (faster, order not fixed); None follows
    ``torch.are_deterministic_algorithms_enabled()``.
    backend: None (auto), "reference" (torch.index_add_), "cpp", "cuda" or "triton"."""
    _check_src(src)
    _check_keys("index", index, src.shape[0])
    check_same_device(src=src, index=index)
    num_segments = _check_segments(num_segments)
    chosen = resolve("scatter_add", src.device, backend)
    if chosen == "reference":
        return reference.scatter_add(src, index, num_segments)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    rows = _rows_of(src)
    if chosen == "cpp":
        out = torch.ops.dynkernels.scatter_add(rows, index, num_segments)
    elif deterministic:
        segments = sort_segments(index, num_segments)
        out = _segment_reduce(chosen, rows.index_select(0, segments.perm), segments.offsets, "sum")
    elif chosen == "triton":
        out = torch.ops.dynkernels.scatter_add_triton(rows, index, num_segments)
    else:
        out = torch.ops.dynkernels.scatter_add(rows, index, num_segments)
    return out.reshape(num_segments, *src.shape[1:])


def scatter_reduce(
    src: torch.Tensor, index: torch.Tensor, num_segments: int, reduce: str = "sum", *, backend: str | None = None
) -> torch.Tensor:
    """out (S, *), out[s] = sum / mean / max of the rows i with index[i] == s
    (0 for an empty s), as ``torch.zeros(S, ...).scatter_reduce(0, index,
    src, reduce, include_self=False)`` gives it; entries outside [0, S) are
    dropped. Sorted by index, then reduced in row order: deterministic.
    backend: None (auto), "reference" (torch.scatter_reduce), "cpp", "cuda" or "triton"."""
    _check_src(src)
    _check_keys("index", index, src.shape[0])
    check_same_device(src=src, index=index)
    num_segments = _check_segments(num_segments)
    _check_reduce(reduce)
    chosen = resolve("scatter_reduce", src.device, backend)
    if chosen == "reference":
        return reference.scatter_reduce(src, index, num_segments, reduce)
    segments = sort_segments(index, num_segments)
    out = _segment_reduce(chosen, _rows_of(src).index_select(0, segments.perm), segments.offsets, reduce)
    return out.reshape(num_segments, *src.shape[1:])


# ---- torch.library registrations: fake kernels and autograd ----------------


@torch.library.custom_op("dynkernels::segment_reduce_triton", mutates_args=())
def _segment_reduce_triton(src: torch.Tensor, offsets: torch.Tensor, reduce: str) -> torch.Tensor:
    return family_kernels(FAMILY).segment_reduce(src, offsets, reduce)


@torch.library.custom_op("dynkernels::scatter_add_triton", mutates_args=())
def _scatter_add_triton(src: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    return family_kernels(FAMILY).scatter_add(src, index, num_segments)


def segment_ids(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows,) int64: each sorted row's segment, S for rows in none (outside
    offsets[0] .. offsets[S]); device-side (searchsorted)."""
    r = torch.arange(rows, device=offsets.device)
    seg = torch.searchsorted(offsets[1:], r, right=True)
    return torch.where(r >= offsets[0], seg, offsets.numel() - 1)


def _segment_reduce_setup(ctx, inputs, output):
    src, offsets, reduce = inputs
    ctx.reduce = reduce
    ctx.save_for_backward(src, offsets, output if reduce == "max" else None)


def _segment_reduce_backward_for(op):
    def backward(ctx, grad):
        src, offsets, out = ctx.saved_tensors
        seg = segment_ids(offsets, src.shape[0])
        if ctx.reduce == "sum":
            return gather_rows(grad, seg), None, None
        counts = (offsets[1:] - offsets[:-1]).clamp_min(1).to(grad.dtype)
        if ctx.reduce == "mean":
            return gather_rows(grad / counts[:, None], seg), None, None
        # max: the gradient shared evenly among each segment's tied maxima
        at_max = gather_rows(out, seg)
        hit = (src == at_max) | (src.isnan() & at_max.isnan())
        hit &= (seg < counts.numel())[:, None]
        ties = op(hit.to(src.dtype), offsets, "sum").clamp_min(1)
        return torch.where(hit, gather_rows(grad / ties, seg), 0), None, None

    return backward


def _scatter_add_setup(ctx, inputs, output):
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _scatter_add_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return gather_rows(grad, index), None, None


def _fake_segment_reduce(src, offsets, reduce):
    return src.new_empty((offsets.shape[0] - 1, src.shape[1]))


def _fake_scatter_add(src, index, num_segments):
    return src.new_empty((num_segments, src.shape[1]))


for _name in ["dynkernels::segment_reduce"] * has_extension() + ["dynkernels::segment_reduce_triton"]:
    _op = torch.ops.dynkernels.segment_reduce if _name.endswith("reduce") else torch.ops.dynkernels.segment_reduce_triton
    torch.library.register_fake(_name)(_fake_segment_reduce)
    torch.library.register_autograd(_name, _segment_reduce_backward_for(_op), setup_context=_segment_reduce_setup)
for _name in ["dynkernels::scatter_add"] * has_extension() + ["dynkernels::scatter_add_triton"]:
    torch.library.register_fake(_name)(_fake_scatter_add)
    torch.library.register_autograd(_name, _scatter_add_backward, setup_context=_scatter_add_setup)
