"""Triton kernel for ISDA's full-covariance estimator update (work in
progress, issue 5).

The batch's rows, centred on their class mean and sorted by label, form K
segments (one per present class). One program per (present class k, tile
pair (I, J) with I <= J) accumulates S_b[I, J] = X_k[:, I]^T X_k[:, J] over
the class's rows with tl.dot, then merges in place
    Sigma_c[I, J] = (1 - w) Sigma_c[I, J] + (w / n_b) S[I, J] + w (1 - w) delta_I delta_J^T
and writes the transposed tile to Sigma_c[J, I], so Sigma stays exactly
symmetric. N A^2 multiply-adds in all (each row meets only its own class).

Naming ladder: ``_isda_update_full_kernel`` (jit) -> ``isda_update_full``
(launcher) -> ``dynkernels.ops.isda_update_``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _isda_update_full_kernel(
    x_ptr,  # (N, A) centred rows, sorted by class
    seg_ptr,  # (K + 1,) segment starts
    cls_ptr,  # (K,) class of each segment
    w_ptr,  # (K,) merge weight
    delta_ptr,  # (K, A) old mean - batch mean
    cov_ptr,  # (C, A, A), updated in place
    A,
    tiles,
    BT: tl.constexpr,
    BR: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    k = tl.program_id(0)
    pair = tl.program_id(1)
    # pair -> (ti, tj), ti <= tj, row-major over the upper triangle of tiles
    ti = 0
    left = pair
    while left >= tiles - ti:
        left -= tiles - ti
        ti += 1
    tj = ti + left
    start = tl.load(seg_ptr + k)
    end = tl.load(seg_ptr + k + 1)
    c = tl.load(cls_ptr + k)
    w = tl.load(w_ptr + k).to(COMPUTE)
    cols_i = ti * BT + tl.arange(0, BT)
    cols_j = tj * BT + tl.arange(0, BT)
    acc = tl.zeros([BT, BT], COMPUTE)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        ok_r = rows < end
        xi = tl.load(x_ptr + rows[:, None] * A + cols_i[None, :], mask=ok_r[:, None] & (cols_i[None, :] < A), other=0.0)
        xj = tl.load(x_ptr + rows[:, None] * A + cols_j[None, :], mask=ok_r[:, None] & (cols_j[None, :] < A), other=0.0)
        acc += tl.dot(tl.trans(xi.to(COMPUTE)), xj.to(COMPUTE), input_precision="ieee", out_dtype=COMPUTE)
    n_b = (end - start).to(COMPUTE)
    di = tl.load(delta_ptr + k * A + cols_i, mask=cols_i < A, other=0.0).to(COMPUTE)
    dj = tl.load(delta_ptr + k * A + cols_j, mask=cols_j < A, other=0.0).to(COMPUTE)
    ok = (cols_i[:, None] < A) & (cols_j[None, :] < A)
    base = cov_ptr + c.to(tl.int64) * A * A
    old = tl.load(base + cols_i[:, None] * A + cols_j[None, :], mask=ok, other=0.0).to(COMPUTE)
    new = (1.0 - w) * old + (w / n_b) * acc + (w * (1.0 - w)) * (di[:, None] * dj[None, :])
    if ti == tj:
        # a diagonal tile: keep its upper half and mirror it, so the tile is exactly symmetric
        upper = cols_i[:, None] <= cols_j[None, :]
        new = tl.where(upper, new, 0.0)
        new = new + tl.trans(tl.where(cols_i[:, None] < cols_j[None, :], new, 0.0))
    tl.store(base + cols_i[:, None] * A + cols_j[None, :], new.to(cov_ptr.dtype.element_ty), mask=ok)
    if ti != tj:
        tl.store(
            base + cols_j[:, None] * A + cols_i[None, :], tl.trans(new).to(cov_ptr.dtype.element_ty), mask=tl.trans(ok)
        )


@triton.jit
def _segment_moments_kernel(
    x_ptr,  # (N, A) rows sorted by class
    seg_ptr,  # (K + 1,) segment starts
    mean_ptr,  # (K, A) out: per-class batch mean
    sq_ptr,  # (K, A) out: per-class sum of centred squares
    A,
    BA: tl.constexpr,
    BR: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Per present class and block of columns, in row order (deterministic,
    no atomics): the mean, then the sum of squares about it (two passes)."""
    k = tl.program_id(0)
    cols = tl.program_id(1) * BA + tl.arange(0, BA)
    start = tl.load(seg_ptr + k)
    end = tl.load(seg_ptr + k + 1)
    total = tl.zeros([BA], COMPUTE)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        x = tl.load(
            x_ptr + rows[:, None] * A + cols[None, :], mask=(rows[:, None] < end) & (cols[None, :] < A), other=0.0
        )
        total += tl.sum(x.to(COMPUTE), axis=0)
    mu = total / (end - start).to(COMPUTE)
    sq = tl.zeros([BA], COMPUTE)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        ok = (rows[:, None] < end) & (cols[None, :] < A)
        x = tl.load(x_ptr + rows[:, None] * A + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
        d = tl.where(ok, x - mu[None, :], 0.0)
        sq += tl.sum(d * d, axis=0)
    tl.store(mean_ptr + k * A + cols, mu, mask=cols < A)
    tl.store(sq_ptr + k * A + cols, sq, mask=cols < A)


def segment_moments(x_sorted, segments, compute_dtype, block: int = 64):
    """(mean (K, A), sum of centred squares (K, A)) per segment of sorted rows."""
    k = segments.numel() - 1
    a = x_sorted.shape[1]
    mean = torch.empty(k, a, dtype=compute_dtype, device=x_sorted.device)
    sq = torch.empty_like(mean)
    if k > 0:
        _segment_moments_kernel[(k, triton.cdiv(a, block))](
            x_sorted.contiguous(),
            segments,
            mean,
            sq,
            a,
            BA=block,
            BR=16,
            COMPUTE=tl.float64 if compute_dtype == torch.float64 else tl.float32,
        )
    return mean, sq


def isda_update_full(cov, x_sorted, segments, classes, w, delta, block: int = 32) -> None:
    """In place on cov (C, A, A) contiguous: see the module docstring."""
    k = classes.numel()
    if k == 0:
        return
    a = cov.shape[1]
    tiles = triton.cdiv(a, block)
    compute = tl.float64 if cov.dtype == torch.float64 else tl.float32
    _isda_update_full_kernel[(k, tiles * (tiles + 1) // 2)](
        x_sorted.contiguous(),
        segments,
        classes,
        w,
        delta.contiguous(),
        cov,
        a,
        tiles,
        BT=block,
        BR=16,
        COMPUTE=compute,
    )
