"""Triton kernels for Pointformer's local attention: softmax attention inside
many small groups (S <= 64 tokens), one program per group looping over its
heads, so the head-averaged row for coordinate refinement is summed in a fixed
order without atomics, and no S x S map ever reaches memory.

Naming ladder: ``_local_attention_fwd_kernel`` (jit) -> ``local_attention_fwd``
(launcher) -> ``dynkernels.ops.local_attention``.

Shapes: q, k, v, out (G, H, S, D); lse (G, H, S) (float32, float64 for float64
inputs); row_index (G,) int64 in [-1, S) or empty; weights (G, S). Every dot
product runs in fp32 (IEEE, no TF32) or fp64, so half inputs are upcast.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _load_head(ptr, base, rows, cols, S, D):
    m = (rows[:, None] < S) & (cols[None, :] < D)
    return tl.load(ptr + base + rows[:, None] * D + cols[None, :], mask=m, other=0.0)


@triton.jit
def _probabilities(q, k, lse_or_none, rows, cols_s, S, scale, COMPUTE: tl.constexpr, FROM_LSE: tl.constexpr):
    scores = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=COMPUTE) * scale
    scores = tl.where(cols_s[None, :] < S, scores, float("-inf"))
    if FROM_LSE:
        p = tl.exp(scores - lse_or_none[:, None])
        lse = lse_or_none
    else:
        row_max = tl.max(scores, axis=1)
        p = tl.exp(scores - row_max[:, None])
        total = tl.sum(p, axis=1)
        p = p / total[:, None]
        lse = row_max + tl.log(total)
    p = tl.where((rows[:, None] < S) & (cols_s[None, :] < S), p, 0.0)
    return p, lse


@triton.jit
def _local_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    row_ptr,
    out_ptr,
    lse_ptr,
    w_ptr,
    H,
    S,
    D,
    scale,
    HAS_ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    w_acc = tl.zeros((BLOCK_S,), dtype=COMPUTE)
    # Without rows the launcher passes a one-element dummy: always a valid read, never used.
    r = tl.load(row_ptr + g * HAS_ROWS)
    for h in range(H):
        base = (g * H + h) * S * D
        q = _load_head(q_ptr, base, rows, cols, S, D).to(COMPUTE)
        k = _load_head(k_ptr, base, rows, cols, S, D).to(COMPUTE)
        v = _load_head(v_ptr, base, rows, cols, S, D).to(COMPUTE)
        p, lse = _probabilities(q, k, 0.0, rows, rows, S, scale, COMPUTE, False)
        out = tl.dot(p, v, input_precision="ieee", out_dtype=COMPUTE)
        m = (rows[:, None] < S) & (cols[None, :] < D)
        tl.store(out_ptr + base + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(lse_ptr + (g * H + h) * S + rows, lse.to(lse_ptr.dtype.element_ty), mask=rows < S)
        if HAS_ROWS:
            if r >= 0:
                w_acc += tl.sum(tl.where(rows[:, None] == r, p, 0.0), axis=0)
            else:
                w_acc += tl.sum(p, axis=0) / S
    if HAS_ROWS:
        tl.store(w_ptr + g * S + rows, (w_acc / H).to(w_ptr.dtype.element_ty), mask=rows < S)


@triton.jit
def _local_attention_bwd_kernel(
    do_ptr,
    dw_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    row_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    H,
    S,
    D,
    scale,
    HAS_ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < S) & (cols[None, :] < D)
    # d weights / d p[h, i, :] = dw / H on the picked row, dw / (H S) on every row for the mean.
    extra = tl.zeros((BLOCK_S, BLOCK_S), dtype=COMPUTE)
    if HAS_ROWS:
        r = tl.load(row_ptr + g)
        dw = tl.load(dw_ptr + g * S + rows, mask=rows < S, other=0.0).to(COMPUTE) / H
        if r >= 0:
            extra = tl.where(rows[:, None] == r, dw[None, :], 0.0)
        else:
            extra = tl.where(rows[:, None] < S, dw[None, :] / S, 0.0)
    for h in range(H):
        base = (g * H + h) * S * D
        q = _load_head(q_ptr, base, rows, cols, S, D).to(COMPUTE)
        k = _load_head(k_ptr, base, rows, cols, S, D).to(COMPUTE)
        v = _load_head(v_ptr, base, rows, cols, S, D).to(COMPUTE)
        do = _load_head(do_ptr, base, rows, cols, S, D).to(COMPUTE)
        lse = tl.load(lse_ptr + (g * H + h) * S + rows, mask=rows < S, other=0.0).to(COMPUTE)
        p, _ = _probabilities(q, k, lse, rows, rows, S, scale, COMPUTE, True)
        dv = tl.dot(tl.trans(p), do, input_precision="ieee", out_dtype=COMPUTE)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee", out_dtype=COMPUTE) + extra
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        dq = tl.dot(ds, k, input_precision="ieee", out_dtype=COMPUTE) * scale
        dk = tl.dot(tl.trans(ds), q, input_precision="ieee", out_dtype=COMPUTE) * scale
        offs = base + rows[:, None] * D + cols[None, :]
        tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty), mask=m)
        tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=m)
        tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=m)


def _config(q: torch.Tensor):
    s, d = q.shape[2], q.shape[3]
    block_s = max(16, triton.next_power_of_2(s))
    block_d = max(16, triton.next_power_of_2(d))
    compute = tl.float64 if q.dtype == torch.float64 else tl.float32
    return block_s, block_d, compute, math.sqrt(1.0 / d)


def _rows_arg(q, row_index):
    """(has_rows, the row pointer argument): without rows, a one-element dummy
    the kernels read but never use."""
    has_rows = row_index.numel() > 0
    return has_rows, (row_index.contiguous() if has_rows else q.new_empty((1,), dtype=torch.int64))


def local_attention_fwd(q, k, v, row_index):
    """-> (out (G, H, S, D), weights (G, S), lse (G, H, S))."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g, h, s, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((g, h, s), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    weights = q.new_empty((g, s))
    if q.numel() == 0:
        return out, weights.zero_(), lse
    block_s, block_d, compute, scale = _config(q)
    has_rows, rows = _rows_arg(q, row_index)
    _local_attention_fwd_kernel[(g,)](
        q,
        k,
        v,
        rows,
        out,
        lse,
        weights,
        h,
        s,
        d,
        scale,
        HAS_ROWS=has_rows,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        COMPUTE=compute,
    )
    if not has_rows:
        weights.zero_()
    return out, weights, lse


def local_attention_bwd(grad_out, grad_weights, q, k, v, lse, row_index):
    """-> (dq, dk, dv), each (G, H, S, D)."""
    q, k, v, lse = q.contiguous(), k.contiguous(), v.contiguous(), lse.contiguous()
    grad_out, grad_weights = grad_out.contiguous(), grad_weights.contiguous()
    g, h, s, d = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    block_s, block_d, compute, scale = _config(q)
    has_rows, rows = _rows_arg(q, row_index)
    _local_attention_bwd_kernel[(g,)](
        grad_out,
        grad_weights,
        q,
        k,
        v,
        lse,
        rows,
        dq,
        dk,
        dv,
        h,
        s,
        d,
        scale,
        HAS_ROWS=has_rows,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        COMPUTE=compute,
    )
    return dq, dk, dv
