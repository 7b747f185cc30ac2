"""Triton kernels of the shared segment / scatter substrate.

Naming ladder: ``_segment_reduce_kernel`` (jit) -> ``segment_reduce``
(launcher) -> ``dynkernels.ops.segment_reduce`` / ``scatter_reduce`` /
``scatter_add(deterministic=True)``; ``_scatter_add_kernel`` -> ``scatter_add``
-> ``dynkernels.ops.scatter_add(deterministic=False)``.

Shapes: src (rows, D) contiguous; offsets (S + 1,) int64: segment s is
positions offsets[s] .. offsets[s + 1] - 1 (clamped to [0, M)) of perm (M,)
int64, or of src itself without perm (M = rows); perm entries outside
[0, rows) read nothing. index (rows,) int32/int64, entries outside [0, S)
adding nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_REDUCE = {"sum": 0, "mean": 1, "max": 2}


@triton.jit
def _segment_reduce_kernel(
    src_ptr,
    offsets_ptr,
    perm_ptr,
    out_ptr,
    ROWS,
    M,
    D,
    HAS_PERM: tl.constexpr,
    REDUCE: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    ACC: tl.constexpr,
):
    # One program per (segment, block of columns): its rows in order, BR at a
    # time (a fixed order whatever the scheduling: deterministic).
    s = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    c_in = cols < D
    start = tl.minimum(tl.maximum(tl.load(offsets_ptr + s), 0), M)
    stop = tl.minimum(tl.maximum(tl.load(offsets_ptr + s + 1), start), M)
    if REDUCE == 2:
        acc = tl.full([BD], float("-inf"), ACC)
    else:
        acc = tl.zeros([BD], ACC)
    for r0 in range(start, stop, BR):
        positions = r0 + tl.arange(0, BR)
        inside = positions < stop
        if HAS_PERM:
            rows = tl.load(perm_ptr + positions, mask=inside, other=-1)
            inside = inside & (rows >= 0) & (rows < ROWS)
        else:
            rows = positions.to(tl.int64)
        ok = inside[:, None] & c_in[None, :]
        if REDUCE == 2:
            x = tl.load(src_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=float("-inf")).to(ACC)
            nan = tl.sum((x != x).to(tl.int32), axis=0) > 0
            acc = tl.where(nan | (acc != acc), float("nan"), tl.maximum(acc, tl.max(x, axis=0)))
        else:
            x = tl.load(src_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(ACC)
            acc += tl.sum(x, axis=0)
    n = stop - start
    if REDUCE == 1:
        acc = acc / tl.maximum(n, 1).to(ACC)
    acc = tl.where(n > 0, acc, 0.0)
    tl.store(out_ptr + s * D + cols, acc.to(out_ptr.dtype.element_ty), mask=c_in)


@triton.jit
def _scatter_add_kernel(src_ptr, index_ptr, acc_ptr, M, D, S, BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    r_in = rows < M
    seg = tl.load(index_ptr + rows, mask=r_in, other=-1).to(tl.int64)
    ok = (r_in & (seg >= 0) & (seg < S))[:, None] & (cols[None, :] < D)
    x = tl.load(src_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0)
    tl.atomic_add(acc_ptr + seg[:, None] * D + cols[None, :], x.to(acc_ptr.dtype.element_ty), mask=ok)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(d: int) -> int:
    return min(128, triton.next_power_of_2(max(d, 1)))


def segment_reduce(src: torch.Tensor, offsets: torch.Tensor, perm: torch.Tensor | None, reduce: str) -> torch.Tensor:
    src, offsets = src.contiguous(), offsets.contiguous()
    rows, d = src.shape
    segments = offsets.numel() - 1
    out = torch.empty((segments, d), dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    bd = _block_d(d)
    m = rows if perm is None else perm.numel()
    _segment_reduce_kernel[(segments, triton.cdiv(d, bd))](
        src,
        offsets,
        offsets if perm is None else perm.contiguous(),
        out,
        rows,
        m,
        d,
        HAS_PERM=perm is not None,
        REDUCE=_REDUCE[reduce],
        BR=16,
        BD=bd,
        ACC=_acc_dtype(src.dtype),
    )
    return out


def scatter_add(src: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Atomic: the order of the additions follows the scheduling."""
    src, index = src.contiguous(), index.contiguous()
    m, d = src.shape
    acc_dtype = torch.float64 if src.dtype == torch.float64 else torch.float32
    acc = torch.zeros((num_segments, d), dtype=acc_dtype, device=src.device)
    if m and d and num_segments:
        bd = _block_d(d)
        _scatter_add_kernel[(triton.cdiv(m, 16), triton.cdiv(d, bd))](src, index, acc, m, d, num_segments, BR=16, BD=bd)
    return acc.to(src.dtype)
