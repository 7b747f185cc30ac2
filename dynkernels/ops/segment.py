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
    src: torch.Tensor,
    offsets: torch.Tensor,
    reduce: str = "sum",
    *,
    perm: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Reduce each segment of rows sorted by segment: segment s is rows
    ``offsets[s] .. offsets[s + 1] - 1`` of src (M, *), or with ``perm``
    (P,) int64, rows ``perm[offsets[s]] .. perm[offsets[s + 1] - 1]`` (read in
    place: no sorted copy of src). offsets (S + 1,) int64, non-decreasing,
    within [0, M] (or [0, P]); :func:`sort_segments` gives offsets and perm.
    Returns (S, *). reduce: "sum", "mean" or "max" (NaN propagates). Taken in
    segment order on every backend: deterministic. On CPU bad offsets or perm
    entries raise; on GPUs each segment's range is clamped and bad perm entries
    read nothing (no host sync). The gradient to src adds each position's
    share into its row (rows repeated in perm get the sum).
    backend: None (auto), "reference", "cpp", "cuda" or "triton"."""
    _check_src(src)
    _check_keys("offsets", offsets)
    if offsets.dtype != torch.int64 or offsets.numel() < 1:
        raise ValueError(f"offsets must be int64 with S + 1 >= 1 entries, got {offsets.dtype} ({offsets.numel()})")
    check_same_device(src=src, offsets=offsets)
    if perm is not None:
        _check_keys("perm", perm)
        if perm.dtype != torch.int64:
            raise ValueError(f"perm must be int64, got {perm.dtype}")
        check_same_device(src=src, perm=perm)
    _check_reduce(reduce)
    chosen = resolve("segment_reduce", src.device, backend)
    if chosen == "reference":
        return reference.segment_reduce(src if perm is None else src.index_select(0, perm), offsets, reduce)
    out = _segment_reduce(chosen, _rows_of(src), offsets, perm, reduce)
    return out.reshape(offsets.numel() - 1, *src.shape[1:])


def _segment_reduce(chosen: str, rows, offsets, perm, reduce: str) -> torch.Tensor:
    if chosen == "triton":
        return torch.ops.dynkernels.segment_reduce_triton(rows, offsets, perm, reduce)
    return torch.ops.dynkernels.segment_reduce(rows, offsets, perm, reduce)


def _sorted_reduce(chosen: str, rows, index, num_segments: int, reduce: str) -> torch.Tensor:
    """GPU form of a scatter: a stable sort by index, then segment_reduce through the permutation."""
    segments = sort_segments(index, num_segments)
    return _segment_reduce(chosen, rows, segments.offsets, segments.perm, reduce)


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
    if chosen == "cpp" or (chosen == "cuda" and not deterministic):
        out = torch.ops.dynkernels.scatter_reduce(rows, index, num_segments, "sum")
    elif deterministic:
        out = _sorted_reduce(chosen, rows, index, num_segments, "sum")
    else:
        out = torch.ops.dynkernels.scatter_add_triton(rows, index, num_segments)
    return out.reshape(num_segments, *src.shape[1:])


def scatter_reduce(
    src: torch.Tensor, index: torch.Tensor, num_segments: int, reduce: str = "sum", *, backend: str | None = None
) -> torch.Tensor:
    """out (S, *), out[s] = sum / mean / max of the rows i with index[i] == s
    (0 for an empty s), as ``torch.zeros(S, ...).scatter_reduce(0, index,
    src, reduce, include_self=False)`` gives it; entries outside [0, S) are
    dropped. Deterministic everywhere: the C++ kernel reduces in row order;
    the GPU backends sort by index (stable) and reduce each segment in a fixed
    order (the CUDA kernel row by row, as the C++ one: equal bits; Triton in
    blocks of 16 rows).
    backend: None (auto), "reference" (torch.scatter_reduce), "cpp", "cuda" or "triton"."""
    _check_src(src)
    _check_keys("index", index, src.shape[0])
    check_same_device(src=src, index=index)
    num_segments = _check_segments(num_segments)
    _check_reduce(reduce)
    chosen = resolve("scatter_reduce", src.device, backend)
    if chosen == "reference":
        return reference.scatter_reduce(src, index, num_segments, reduce)
    rows = _rows_of(src)
    if chosen == "cpp":
        out = torch.ops.dynkernels.scatter_reduce(rows, index, num_segments, reduce)
    else:
        out = _sorted_reduce(chosen, rows, index, num_segments, reduce)
    return out.reshape(num_segments, *src.shape[1:])


def segment_ids(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows,) int64: each sorted row's segment, S for rows in none (outside
    offsets[0] .. offsets[S]); device-side (searchsorted)."""
    r = torch.arange(rows, device=offsets.device)
    seg = torch.searchsorted(offsets[1:], r, right=True)
    return torch.where(r >= offsets[0], seg, offsets.numel() - 1)


# ---- torch.library registrations: fake kernels and autograd ----------------
#
# The gradients are written with gather_rows (torch's index_select) and the
# ops themselves (the count of tied maxima), so they are differentiable again.


@torch.library.custom_op("dynkernels::segment_reduce_triton", mutates_args=())
def _segment_reduce_triton(
    src: torch.Tensor, offsets: torch.Tensor, perm: torch.Tensor | None, reduce: str
) -> torch.Tensor:
    return family_kernels(FAMILY).segment_reduce(src, offsets, perm, reduce)


@torch.library.custom_op("dynkernels::scatter_add_triton", mutates_args=())
def _scatter_add_triton(src: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    return family_kernels(FAMILY).scatter_add(src, index, num_segments)


def _shares(reduce: str, values, at_max_of, grad_of, count_ties, counts) -> torch.Tensor:
    """Each row's (position's) gradient: grad_of(t) gathers t (S, D) to the
    rows; max shares it evenly among the tied maxima."""
    if reduce == "sum":
        return grad_of(None)
    if reduce == "mean":
        return grad_of(counts.clamp_min(1).to(values.dtype)[:, None])
    at_max = at_max_of()
    hit = (values == at_max) | (values.isnan() & at_max.isnan())
    ties = count_ties(hit.to(values.dtype))
    return torch.where(hit, grad_of(ties.clamp_min(1)), 0)


def _segment_reduce_setup(ctx, inputs, output):
    src, offsets, perm, reduce = inputs
    ctx.reduce, ctx.has_perm = reduce, perm is not None
    ctx.save_for_backward(src, offsets, perm, output if reduce == "max" else None)


def _segment_reduce_backward_for(op):
    def backward(ctx, grad):
        src, offsets, perm, out = ctx.saved_tensors
        positions = perm.shape[0] if ctx.has_perm else src.shape[0]
        seg = segment_ids(offsets, positions)  # S for positions in no segment: a zero row
        values = src if not ctx.has_perm or ctx.reduce != "max" else src.index_select(0, perm)
        share = _shares(
            ctx.reduce,
            values,
            lambda: gather_rows(out, seg),
            lambda scale: gather_rows(grad if scale is None else grad / scale, seg),
            lambda hit: op(hit, offsets, None, "sum"),
            offsets[1:] - offsets[:-1],
        )
        if ctx.has_perm:
            share = torch.zeros_like(src).index_add(0, perm, share)
        return share, None, None, None

    return backward


def _scatter_setup(ctx, inputs, output):
    src, index, num_segments, *rest = inputs
    ctx.reduce = rest[0] if rest else "sum"
    ctx.inputs = len(inputs)
    ctx.num_segments = num_segments
    ctx.save_for_backward(src, index, output if ctx.reduce == "max" else None)


def _scatter_backward(ctx, grad):
    src, index, out = ctx.saved_tensors
    segments = ctx.num_segments
    k = index.long()
    seg = torch.where((k >= 0) & (k < segments), k, segments)
    counts = None
    if ctx.reduce == "mean":
        counts = scatter_add(torch.ones_like(src[:, :1]), index, segments)[:, 0]
    share = _shares(
        ctx.reduce,
        src,
        lambda: gather_rows(out, seg),
        lambda scale: gather_rows(grad if scale is None else grad / scale, seg),
        lambda hit: torch.ops.dynkernels.scatter_reduce(hit, index, segments, "sum"),
        counts,
    )
    return (share,) + (None,) * (ctx.inputs - 1)


def _fake_segment_reduce(src, offsets, perm, reduce):
    return src.new_empty((offsets.shape[0] - 1, src.shape[1]))


def _fake_scatter(src, index, num_segments, reduce="sum"):
    return src.new_empty((num_segments, src.shape[1]))


_SEGMENT_OPS = (["dynkernels::segment_reduce"] if has_extension() else []) + ["dynkernels::segment_reduce_triton"]
for _name in _SEGMENT_OPS:
    _op = getattr(torch.ops.dynkernels, _name.split("::")[1]).default
    torch.library.register_fake(_name)(_fake_segment_reduce)
    torch.library.register_autograd(_name, _segment_reduce_backward_for(_op), setup_context=_segment_reduce_setup)
for _name in (["dynkernels::scatter_reduce"] if has_extension() else []) + ["dynkernels::scatter_add_triton"]:
    torch.library.register_fake(_name)(_fake_scatter)
    torch.library.register_autograd(_name, _scatter_backward, setup_context=_scatter_setup)
