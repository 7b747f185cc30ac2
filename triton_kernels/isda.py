"""Triton kernel for ISDA's full-covariance estimator update.

The batch's rows, centred on their class mean and sorted by label, form one
segment per class (the shared substrate: dynkernels.ops.segment; absent
classes have empty segments). One program per (class c, tile pair (I, J)
with I <= J) accumulates S_b[I, J] = X_c[:, I]^T X_c[:, J] over the class's
rows with tl.dot, then merges in place
    Sigma_c[I, J] = (1 - w) Sigma_c[I, J] + (w / n_b) S[I, J] + w (1 - w) delta_I delta_J^T
and writes the transposed tile to Sigma_c[J, I], so Sigma stays exactly
symmetric. N A^2 multiply-adds in all (each row meets only its own class);
the programs of absent classes load and store nothing. No host sync: the
grid is (C, tile pairs), known from shapes.

Naming ladder: ``_isda_update_full_kernel`` (jit) -> ``isda_update_full``
(launcher) -> ``dynkernels.ops.isda_update_``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _isda_update_full_kernel(
    x_ptr,  # (M, A) centred rows, sorted by class
    seg_ptr,  # (C + 1,) segment starts
    w_ptr,  # (C,) merge weight
    delta_ptr,  # (C, A) old mean - batch mean
    cov_ptr,  # (C, A, A), updated in place
    A,
    tiles,
    BT: tl.constexpr,
    BR: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    pair = tl.program_id(1)
    # pair -> (ti, tj), ti <= tj, row-major over the upper triangle of tiles
    ti = 0
    left = pair
    while left >= tiles - ti:
        left -= tiles - ti
        ti += 1
    tj = ti + left
    start = tl.load(seg_ptr + c)
    end = tl.load(seg_ptr + c + 1)
    present = end > start
    w = tl.load(w_ptr + c).to(COMPUTE)
    cols_i = ti * BT + tl.arange(0, BT)
    cols_j = tj * BT + tl.arange(0, BT)
    acc = tl.zeros([BT, BT], COMPUTE)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        ok_r = rows < end
        xi = tl.load(x_ptr + rows[:, None] * A + cols_i[None, :], mask=ok_r[:, None] & (cols_i[None, :] < A), other=0.0)
        xj = tl.load(x_ptr + rows[:, None] * A + cols_j[None, :], mask=ok_r[:, None] & (cols_j[None, :] < A), other=0.0)
        acc += tl.dot(tl.trans(xi.to(COMPUTE)), xj.to(COMPUTE), input_precision="ieee", out_dtype=COMPUTE)
    n_b = tl.maximum(end - start, 1).to(COMPUTE)
    di = tl.load(delta_ptr + c * A + cols_i, mask=(cols_i < A) & present, other=0.0).to(COMPUTE)
    dj = tl.load(delta_ptr + c * A + cols_j, mask=(cols_j < A) & present, other=0.0).to(COMPUTE)
    ok = (cols_i[:, None] < A) & (cols_j[None, :] < A) & present
    base = cov_ptr + c * A * A
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


def isda_update_full(cov, centred, offsets, w, delta, block: int = 32) -> None:
    """In place on cov (C, A, A) contiguous: see the module docstring."""
    classes, a = cov.shape[0], cov.shape[1]
    if classes == 0 or a == 0 or centred.shape[0] == 0:
        return
    tiles = triton.cdiv(a, block)
    compute = tl.float64 if cov.dtype == torch.float64 else tl.float32
    _isda_update_full_kernel[(classes, tiles * (tiles + 1) // 2)](
        centred.contiguous(),
        offsets,
        w.contiguous(),
        delta.contiguous(),
        cov,
        a,
        tiles,
        BT=block,
        BR=16,
        COMPUTE=compute,
    )
