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
* ``softmax_with_policy`` / ``..._backward``: DynamicViT's policy softmax (see
  csrc/token_routing/policy_softmax_cpu.cpp for the formulas), one program
  per row (the whole row in registers); the backward writes the row's
  gradient and its statistics (max, <g, out>, 1 / (U + eps)), then one
  program per (sample, column block) sums the policy gradient over heads and
  rows in order (deterministic, no atomics).
* ``tome_best``: ToMe's node_max / node_idx without the score matrix: per
  (sample, BM A rows) the cosine scores against BN B rows at a time by tl.dot
  (IEEE), the running max replaced only by a strictly greater tile max (tl's
  argmax breaks ties to the left: ties keep the lower index), a NaN winning
  and staying (as torch.max), the class token's row and the distillation
  token's column at -inf.
* ``grouped_mm_wgrad``: dW[e] = x_e^T g_e, one (expert, K block, N block) per
  program over the segment's rows in order (deterministic, no atomics); an
  empty segment gives zeros.

Accumulation in float32 (float64 for float64 inputs)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "combine",
    "combine_backward",
    "gather",
    "grouped_mm",
    "grouped_mm_wgrad",
    "softmax_with_policy",
    "softmax_with_policy_backward",
    "tome_best",
]


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


@triton.jit
def _policy_row(a_ptr, p_ptr, row, N, H, EPS, BN: tl.constexpr, ACC: tl.constexpr):
    """One row's (cols, in-row mask, logits, e_j, u_j, U + eps, max position) in ACC.
    EPS arrives as a loaded value of the ACC type (a float argument would be float32)."""
    cols = tl.arange(0, BN)
    inside = cols < N
    i = row % N
    a = tl.load(a_ptr + row * N + cols, mask=inside, other=float("-inf")).to(ACC)
    p = tl.load(p_ptr + (row // (H * N)) * N + cols, mask=inside, other=0.0).to(ACC)
    m = tl.max(a, axis=0)
    e = tl.where(inside, tl.exp(a - m), 0.0)
    u = tl.where(cols == i, e, e * p)
    return cols, inside, a, e, u, tl.sum(u, axis=0) + EPS, tl.argmax(a, axis=0), m


@triton.jit
def _policy_forward_kernel(a_ptr, p_ptr, out_ptr, eps_ptr, N, H, BN: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    EPS = tl.load(eps_ptr)
    cols, inside, a, e, u, denom, at, m = _policy_row(a_ptr, p_ptr, row, N, H, EPS, BN, ACC)
    out = (u + EPS / N) / denom
    tl.store(out_ptr + row * N + cols, out.to(out_ptr.dtype.element_ty), mask=inside)


def softmax_with_policy(attn: torch.Tensor, policy: torch.Tensor, eps: float) -> torch.Tensor:
    b, h, n, _ = attn.shape
    out = torch.empty(attn.shape, dtype=attn.dtype, device=attn.device)
    if out.numel():
        p = policy.reshape(b, n).to(_float_of(attn)).contiguous()
        _policy_forward_kernel[(b * h * n,)](attn.contiguous(), p, out, _scalar(eps, attn), n, h, BN=triton.next_power_of_2(n),
                                             ACC=_compute(attn))  # fmt: skip
    return out


@triton.jit
def _policy_backward_kernel(g_ptr, a_ptr, p_ptr, ga_ptr, stats_ptr, eps_ptr, N, H, NEED_ATTN: tl.constexpr,
                            BN: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    EPS = tl.load(eps_ptr)
    cols, inside, a, e, u, denom, at, m = _policy_row(a_ptr, p_ptr, row, N, H, EPS, BN, ACC)
    g = tl.load(g_ptr + row * N + cols, mask=inside, other=0.0).to(ACC)
    c = EPS / N
    dot = tl.sum(g * (u + c) / denom, axis=0)
    if NEED_ATTN:
        ga = u / denom * (g - dot)
        extra = c * tl.sum(g, axis=0) / denom - dot * EPS / denom
        ga = tl.where(cols == at, ga + extra, ga)
        tl.store(ga_ptr + row * N + cols, ga.to(ga_ptr.dtype.element_ty), mask=inside)
    tl.store(stats_ptr + row * 3, m)
    tl.store(stats_ptr + row * 3 + 1, dot)
    tl.store(stats_ptr + row * 3 + 2, 1.0 / denom)


@triton.jit
def _policy_grad_kernel(g_ptr, a_ptr, stats_ptr, gp_ptr, N, H, BC: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    inside = cols < N
    acc = tl.zeros([BC], ACC)
    for r in range(0, H * N):
        row = b * H * N + r
        m = tl.load(stats_ptr + row * 3)
        dot = tl.load(stats_ptr + row * 3 + 1)
        inv = tl.load(stats_ptr + row * 3 + 2)
        a = tl.load(a_ptr + row * N + cols, mask=inside, other=0.0).to(ACC)
        g = tl.load(g_ptr + row * N + cols, mask=inside, other=0.0).to(ACC)
        keep = inside & (cols != r % N)  # the diagonal's weight does not depend on the policy
        acc += tl.where(keep, tl.exp(a - m) * (g - dot) * inv, 0.0)
    tl.store(gp_ptr + b * N + cols, acc.to(gp_ptr.dtype.element_ty), mask=inside)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([value], dtype=_float_of(like), device=like.device)


def _float_of(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def softmax_with_policy_backward(grad, attn, policy, eps: float, need_attn: bool, need_policy: bool):
    b, h, n, _ = attn.shape
    acc = _float_of(attn)
    grad, attn = grad.to(attn.dtype).contiguous(), attn.contiguous()
    ga = torch.empty(attn.shape, dtype=attn.dtype, device=attn.device) if need_attn else None
    gp = torch.zeros((b, n), dtype=acc, device=attn.device) if need_policy else None
    if attn.numel() and (need_attn or need_policy):
        p = policy.reshape(b, n).to(acc).contiguous()
        stats = torch.empty((b * h * n, 3), dtype=acc, device=attn.device)
        bn = triton.next_power_of_2(n)
        _policy_backward_kernel[(b * h * n,)](grad, attn, p, attn if ga is None else ga, stats, _scalar(eps, attn), n, h,
                                              NEED_ATTN=need_attn, BN=bn, ACC=_compute(attn))  # fmt: skip
        if need_policy:
            bc = min(128, bn)
            _policy_grad_kernel[(b, triton.cdiv(n, bc))](grad, attn, stats, gp, n, h, BC=bc, ACC=_compute(attn))
    return ga, None if gp is None else gp.to(policy.dtype).reshape(b, n, 1)


@triton.jit
def _tome_best_kernel(a_ptr, b_ptr, max_ptr, idx_ptr, NA, NB, C, MT, CLASS: tl.constexpr, DISTILL: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    s = (pid // MT).to(tl.int64)
    rows = (pid % MT) * BM + tl.arange(0, BM)
    r_in = rows < NA
    best = tl.full([BM], float("-inf"), ACC)
    where = tl.zeros([BM], tl.int64)
    dead = tl.zeros([BM], tl.int1)  # NaN seen: the max stays NaN at its first position
    if CLASS:
        dead = rows == 0  # the class token's row is all -inf: max -inf at index 0, as torch.max
    for c0 in range(0, NB, BN):
        cols = c0 + tl.arange(0, BN)
        c_in = cols < NB
        acc = tl.zeros([BM, BN], ACC)
        for k0 in range(0, C, BC):
            ks = k0 + tl.arange(0, BC)
            k_in = ks < C
            a = tl.load(a_ptr + (s * NA + rows)[:, None] * C + ks[None, :], mask=r_in[:, None] & k_in[None, :],
                        other=0.0)  # fmt: skip
            b = tl.load(b_ptr + (s * NB + cols)[None, :] * C + ks[:, None], mask=k_in[:, None] & c_in[None, :],
                        other=0.0)  # fmt: skip
            acc += tl.dot(a, b, input_precision="ieee", out_dtype=ACC)
        valid = c_in[None, :] & r_in[:, None]
        if DISTILL:
            valid = valid & (cols != 0)[None, :]
        is_nan = (acc != acc) & valid
        has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
        first_nan = tl.min(tl.where(is_nan, cols[None, :], NB), axis=1)
        scores = tl.where(valid & (acc == acc), acc, float("-inf"))
        tile_max, tile_at = tl.max(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = (tile_max > best) & ~dead
        best = tl.where(better, tile_max, best)
        where = tl.where(better, (c0 + tile_at).to(tl.int64), where)
        nan_now = has_nan & ~dead
        best = tl.where(nan_now, float("nan"), best)
        where = tl.where(nan_now, first_nan.to(tl.int64), where)
        dead = dead | nan_now
    tl.store(max_ptr + s * NA + rows, best.to(max_ptr.dtype.element_ty), mask=r_in)
    tl.store(idx_ptr + s * NA + rows, where, mask=r_in)


def tome_best(a: torch.Tensor, b: torch.Tensor, class_token: bool, distill_token: bool):
    """(node_max (B, N_a), node_idx (B, N_a) int64) of row-normalised a (B, N_a, C), b (B, N_b, C)."""
    batch, na, c = a.shape
    nb = b.shape[1]
    node_max = torch.full((batch, na), float("-inf"), dtype=a.dtype, device=a.device)
    node_idx = torch.zeros((batch, na), dtype=torch.int64, device=a.device)
    if batch and na and nb:
        bm, bn, bc = _dot_block(na, 64), _dot_block(nb, 64), _dot_block(c, 32)
        mt = triton.cdiv(na, bm)
        _tome_best_kernel[(batch * mt,)](a.contiguous(), b.contiguous(), node_max, node_idx, na, nb, c, mt,
                                         CLASS=class_token, DISTILL=distill_token, BM=bm, BN=bn, BC=bc,
                                         ACC=_compute(a))  # fmt: skip
    return node_max, node_idx
