"""Triton kernels of the token routing family (issue 15): mixture-of-experts
dispatch, grouped GEMM and combine.

* ``gather``: rows of x at ``source`` (a zero row for -1), one (rows x
  channels) tile per program.
* ``combine`` / ``combine_backward``: out[t] = sum_j w[t, j] y[slot[t, j]] in
  slot order; the backward writes w[t, j] g[t] to each assignment's own row
  (rows belong to one assignment: no atomics, deterministic) and one dot per
  assignment for the weights' gradient.
* ``grouped_mm``: per expert segment ``offsets[e] .. offsets[e+1]`` of x,
  ``x_e @ w[e] (+ bias[e])``. The grid is static, (E * cdiv(R, BM), cdiv(N,
  BN)) -- the offsets stay on the device, nothing syncs -- and a program whose
  row block lies past its expert's segment runs an empty K loop and stores
  nothing. tl.dot in IEEE precision (no TF32). ``w`` is read through its
  strides, so ``grouped_mm(g, w.transpose(1, 2))`` is the input gradient.
* ``grouped_mm_wgrad``: dW[e] = x_e^T g_e, one (expert, K block, N block) per
  program over the segment's rows in order (deterministic, no atomics); an
  empty segment gives zeros.

Accumulation in float32 (float64 for float64 inputs)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["combine", "combine_backward", "gather", "grouped_mm", "grouped_mm_wgrad"]


def _compute(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _tile(d: int) -> tuple[int, int]:
    bc = min(128, triton.next_power_of_2(max(d, 1)))
    return max(1, 2048 // bc), bc


def _dot_block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))  # tl.dot needs every dimension >= 16


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, M, NX, D, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    r_in, c_in = rows < M, cols < D
    q = tl.load(idx_ptr + rows, mask=r_in, other=-1)
    ok = (q >= 0) & (q < NX)  # an index out of range reads a zero row (checked on CPU; no sync on GPUs)
    v = tl.load(x_ptr + tl.maximum(q, 0)[:, None] * D + cols[None, :], mask=ok[:, None] & c_in[None, :],
                other=0.0)  # fmt: skip
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], v, mask=r_in[:, None] & c_in[None, :])


def gather(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    m, d = source.shape[0], x.shape[1]
    out = torch.empty((m, d), dtype=x.dtype, device=x.device)
    if out.numel():
        br, bc = _tile(d)
        _gather_kernel[(triton.cdiv(m, br), triton.cdiv(d, bc))](x.contiguous(), source.contiguous(), out, m, x.shape[0], d,
                                                                 BR=br, BC=bc)  # fmt: skip
    return out


@triton.jit
def _combine_kernel(y_ptr, slot_ptr, w_ptr, out_ptr, T, R, D, K, BR: tl.constexpr, BC: tl.constexpr,
                    ACC: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    r_in, c_in = rows < T, cols < D
    acc = tl.zeros([BR, BC], ACC)
    for j in range(K):
        q = tl.load(slot_ptr + rows * K + j, mask=r_in, other=-1)
        wt = tl.load(w_ptr + rows * K + j, mask=r_in, other=0.0).to(ACC)
        ok = (q >= 0) & (q < R)
        v = tl.load(y_ptr + tl.maximum(q, 0)[:, None] * D + cols[None, :], mask=ok[:, None] & c_in[None, :],
                    other=0.0)  # fmt: skip
        acc += wt[:, None] * v.to(ACC)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_in[:, None] & c_in[None, :])  # fmt: skip


def combine(y: torch.Tensor, slot_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    t, k = slot_row.shape
    d = y.shape[1]
    out = torch.empty((t, d), dtype=y.dtype, device=y.device)
    if out.numel():
        br, bc = _tile(d)
        _combine_kernel[(triton.cdiv(t, br), triton.cdiv(d, bc))](y.contiguous(), slot_row.contiguous(),
                                                                  weights.contiguous(), out, t, y.shape[0], d, k, BR=br, BC=bc,
                                                                  ACC=_compute(y))  # fmt: skip
    return out


@triton.jit
def _combine_backward_kernel(g_ptr, y_ptr, slot_ptr, w_ptr, gy_ptr, gw_ptr, T, R, D, K, NEED_Y: tl.constexpr,
                             NEED_W: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    r_in = rows < T
    for j in range(K):
        q = tl.load(slot_ptr + rows * K + j, mask=r_in, other=-1)
        ok = (q >= 0) & (q < R)
        safe = tl.maximum(q, 0)
        wt = tl.load(w_ptr + rows * K + j, mask=r_in, other=0.0).to(ACC)
        dot = tl.zeros([BR], ACC)
        for c0 in range(0, D, BC):
            cols = c0 + tl.arange(0, BC)
            c_in = cols < D
            g = tl.load(g_ptr + rows[:, None] * D + cols[None, :], mask=r_in[:, None] & c_in[None, :], other=0.0)
            g = g.to(ACC)
            if NEED_W:
                v = tl.load(y_ptr + safe[:, None] * D + cols[None, :], mask=ok[:, None] & c_in[None, :], other=0.0)
                dot += tl.sum(g * v.to(ACC), axis=1)
            if NEED_Y:
                tl.store(gy_ptr + safe[:, None] * D + cols[None, :], (wt[:, None] * g).to(gy_ptr.dtype.element_ty),
                         mask=ok[:, None] & c_in[None, :])  # fmt: skip
        if NEED_W:
            tl.store(gw_ptr + rows * K + j, dot.to(gw_ptr.dtype.element_ty), mask=r_in)


def combine_backward(grad, y, slot_row, weights, need_y: bool, need_weights: bool):
    """(grad_y, grad_weights); grad_y is zero-filled first (rows no assignment
    owns -- capacity padding -- get 0; telling whether there are any would
    read the indices on the host)."""
    t, k = slot_row.shape
    d = y.shape[1]
    gy = torch.zeros(y.shape, dtype=y.dtype, device=y.device) if need_y else None
    gw = torch.empty((t, k), dtype=y.dtype, device=y.device) if need_weights else None
    if t and (need_y or need_weights):
        br, bc = 16, min(128, triton.next_power_of_2(max(d, 1)))
        _combine_backward_kernel[(triton.cdiv(t, br),)](grad.contiguous(), y.contiguous(), slot_row.contiguous(),
                                                        weights.contiguous(), y if gy is None else gy,
                                                        y if gw is None else gw, t, y.shape[0], d, k, NEED_Y=need_y,
                                                        NEED_W=need_weights, BR=br, BC=bc,
                                                        ACC=_compute(y))  # fmt: skip
    if gw is not None and d == 0:
        gw.zero_()
    return gy, gw


@triton.jit
def _grouped_mm_kernel(x_ptr, w_ptr, bias_ptr, off_ptr, out_ptr, R, K, N, MT, s_we, s_wk, s_wn, HAS_BIAS: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    e = pid // MT
    start = tl.load(off_ptr + e) + (pid % MT) * BM
    hi = tl.minimum(tl.load(off_ptr + e + 1), R)  # offsets past the rows read nothing (no sync to check them)
    rows = start + tl.arange(0, BM).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    r_in, c_in = (rows < hi) & (rows >= 0), cols < N
    acc = tl.zeros([BM, BN], ACC)
    k_end = tl.where(start < hi, K, 0)  # a block past the segment: no work, no store
    for k0 in range(0, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        k_in = ks < K
        a = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=r_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(w_ptr + e.to(tl.int64) * s_we + ks[:, None] * s_wk + cols[None, :] * s_wn,
                    mask=k_in[:, None] & c_in[None, :], other=0.0)  # fmt: skip
        acc += tl.dot(a, b, input_precision="ieee", out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * N + cols, mask=c_in, other=0.0).to(ACC)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_in[:, None] & c_in[None, :])  # fmt: skip


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None = None):
    r, k = x.shape
    e, _, n = w.shape
    out = torch.empty((r, n), dtype=x.dtype, device=x.device)
    if out.numel():
        bm, bn, bk = _dot_block(r, 64), _dot_block(n, 64), _dot_block(k, 32)
        mt = triton.cdiv(r, bm)
        _grouped_mm_kernel[(e * mt, triton.cdiv(n, bn))](x.contiguous(), w, x if bias is None else bias.contiguous(),
                                                         offsets.contiguous(), out, r, k, n, mt, *w.stride(),
                                                         HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk,
                                                         ACC=_compute(x))  # fmt: skip
    return out


@triton.jit
def _grouped_wgrad_kernel(x_ptr, g_ptr, off_ptr, out_ptr, R, K, N, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                          ACC: tl.constexpr):  # fmt: skip
    e = tl.program_id(0)
    ks = tl.program_id(1) * BK + tl.arange(0, BK)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    k_in, c_in = ks < K, cols < N
    lo = tl.maximum(tl.load(off_ptr + e), 0)
    hi = tl.minimum(tl.load(off_ptr + e + 1), R)
    acc = tl.zeros([BK, BN], ACC)
    for r0 in range(lo, hi, BR):
        rows = r0 + tl.arange(0, BR).to(tl.int64)
        r_in = rows < hi
        a = tl.load(x_ptr + rows[None, :] * K + ks[:, None], mask=k_in[:, None] & r_in[None, :], other=0.0)
        g = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=r_in[:, None] & c_in[None, :], other=0.0)
        acc += tl.dot(a, g, input_precision="ieee", out_dtype=ACC)
    tl.store(out_ptr + e.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=k_in[:, None] & c_in[None, :])  # fmt: skip


def grouped_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, num_experts: int) -> torch.Tensor:
    k, n = x.shape[1], grad.shape[1]
    out = torch.zeros((num_experts, k, n), dtype=x.dtype, device=x.device)
    if x.shape[0] and k and n:
        bk, bn, br = _dot_block(k, 64), _dot_block(n, 64), 32
        _grouped_wgrad_kernel[(num_experts, triton.cdiv(k, bk), triton.cdiv(n, bn))](
            x.contiguous(),
            grad.contiguous(),
            offsets.contiguous(),
            out,
            x.shape[0],
            k,
            n,
            BK=bk,
            BN=bn,
            BR=br,
            ACC=_compute(x),
        )
    return out
