"""Triton kernels of spatially sparse execution (issue 14).

* ``mask_to_index``: ``_dilate_count_kernel`` (one program per image row:
  the row of the mask dilated by a (2 halo + 1)^2 square, as 0/1 bytes, and
  its count), a device cumsum of the row counts (no host sync), then
  ``_compact_kernel`` (per row: an in-row cumsum places each active pixel at
  its row's start + rank; the inverse map on request). Index order: flat
  ``b*H*W + y*W + x`` increasing, as the C++ kernel.
* ``gather`` / ``scatter``: one (rows x channels) tile per program; x is
  read channels-first or channels-last by its layout; "add" uses atomics
  (repeated pixels sum in an unspecified order: bitwise-stable only when
  indices do not repeat, which is what compaction produces).
* ``tap_depthwise`` / ``tap_gemm``: the masked convolutions, driven by a tap
  table (rows, taps) of source rows (-1: zero) built on the device by the
  caller: out[r] = sum_t src[table[r, t]] * w[t] (depthwise: per channel;
  dense: a (BM x BK) @ (BK x BN) tl.dot per tap and K block, IEEE precision,
  no TF32). The same kernels run the input gradient with the transposed
  table (each input row's readers) and the transposed weights.
* ``tap_depthwise_wgrad`` / ``tap_gemm_wgrad``: dW[t] = sum_r src[table[r, t]]^T
  grad[r], one (tap, block) per program over every row in a fixed order:
  deterministic, no atomics.

Accumulation in float32 (float64 for float64 inputs)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "gather",
    "mask_to_index",
    "scatter",
    "tap_depthwise",
    "tap_depthwise_wgrad",
    "tap_gemm",
    "tap_gemm_wgrad",
]


@triton.jit
def _dilate_count_kernel(mask_ptr, act_ptr, counts_ptr, H, W, HALO: tl.constexpr, BW: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # image row b*H + y
    b, y = r // H, r % H
    xs = tl.arange(0, BW)
    inside = xs < W
    acc = tl.zeros([BW], tl.int32)
    for dy in tl.static_range(2 * HALO + 1):
        yy = y + dy - HALO
        row_ok = (yy >= 0) & (yy < H)
        for dx in tl.static_range(2 * HALO + 1):
            xx = xs + dx - HALO
            ok = inside & row_ok & (xx >= 0) & (xx < W)
            v = tl.load(mask_ptr + (b * H + yy) * W + xx, mask=ok, other=0)
            acc = tl.maximum(acc, (v != 0).to(tl.int32))
    tl.store(act_ptr + r * W + xs, acc.to(tl.int8), mask=inside)
    tl.store(counts_ptr + r, tl.sum(acc, axis=0).to(tl.int64))


@triton.jit
def _compact_kernel(act_ptr, starts_ptr, index_ptr, inverse_ptr, W, CAP, WITH_INVERSE: tl.constexpr, BW: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    xs = tl.arange(0, BW)
    inside = xs < W
    a = tl.load(act_ptr + r * W + xs, mask=inside, other=0).to(tl.int64)
    pos = tl.load(starts_ptr + r) + tl.cumsum(a, axis=0) - 1
    pix = r * W + xs
    keep = inside & (a > 0) & (pos < CAP)
    tl.store(index_ptr + pos, pix, mask=keep)
    if WITH_INVERSE:
        tl.store(inverse_ptr + pix, tl.where(keep, pos, -1), mask=inside)


def mask_to_index(mask: torch.Tensor, halo: int, capacity: int, with_inverse: bool):
    """(index, count, inverse) as the C++ op; capacity < 0: the exact count
    (read on the host: CPU tensors only, the caller sees to that)."""
    b, _, h, w = mask.shape
    rows = b * h
    m = mask.contiguous().view(torch.uint8)
    act = torch.empty(b * h * w, dtype=torch.int8, device=mask.device)
    counts = torch.empty(rows, dtype=torch.int64, device=mask.device)
    bw = triton.next_power_of_2(max(w, 1))
    if rows:
        _dilate_count_kernel[(rows,)](m, act, counts, h, w, HALO=halo, BW=bw)
    ends = torch.cumsum(counts, 0)
    count = ends[-1] if rows else counts.new_zeros(())
    size = int(count) if capacity < 0 else capacity
    if capacity >= 0 and mask.device.type == "cpu" and int(count) > capacity:
        raise ValueError(f"capacity overflow: the mask has {int(count)} active pixels, capacity is {capacity}")
    index = torch.full((size,), -1, dtype=torch.int64, device=mask.device)
    inverse = torch.empty((b if with_inverse else 0, h, w), dtype=torch.int64, device=mask.device)
    if rows:
        starts = ends - counts
        _compact_kernel[(rows,)](act, starts, index, inverse, w, size, WITH_INVERSE=with_inverse, BW=bw)
    return index, count.clone(), inverse


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@triton.jit
def _pixel_offsets(pix, cols, C, HW, NHWC: tl.constexpr):
    if NHWC:
        return pix[:, None] * C + cols[None, :]
    return ((pix // HW) * C * HW + pix % HW)[:, None] + cols[None, :].to(tl.int64) * HW


@triton.jit
def _gather_kernel(x_ptr, index_ptr, out_ptr, P, C, HW, NHWC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    r_in, c_in = rows < P, cols < C
    pix = tl.load(index_ptr + rows, mask=r_in, other=-1)
    ok = ((pix >= 0) & r_in)[:, None] & c_in[None, :]
    v = tl.load(x_ptr + _pixel_offsets(tl.maximum(pix, 0), cols, C, HW, NHWC), mask=ok, other=0.0)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], v, mask=r_in[:, None] & c_in[None, :])


@triton.jit
def _scatter_kernel(
    rows_ptr, index_ptr, out_ptr, P, C, HW, ADD: tl.constexpr, NHWC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    r_in, c_in = rows < P, cols < C
    pix = tl.load(index_ptr + rows, mask=r_in, other=-1)
    ok = ((pix >= 0) & r_in)[:, None] & c_in[None, :]
    v = tl.load(rows_ptr + rows[:, None] * C + cols[None, :], mask=ok, other=0.0)
    where = out_ptr + _pixel_offsets(tl.maximum(pix, 0), cols, C, HW, NHWC)
    if ADD:
        tl.atomic_add(where, v, mask=ok)
    else:
        tl.store(where, v, mask=ok)


def _tile(c: int) -> tuple[int, int]:
    bc = min(64, triton.next_power_of_2(max(c, 1)))
    return max(16, 2048 // bc), bc


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    nhwc = _channels_last(x)
    x = x if nhwc else x.contiguous()
    out = torch.empty((index.numel(), c), dtype=x.dtype, device=x.device)
    if out.numel():
        br, bc = _tile(c)
        grid = (triton.cdiv(index.numel(), br), triton.cdiv(c, bc))
        _gather_kernel[grid](x, index, out, index.numel(), c, h * w, NHWC=nhwc, BR=br, BC=bc)
    return out


def scatter(rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor, mode: int) -> torch.Tensor:
    """A copy of out (its layout kept) with rows set (mode 0) or added (1)."""
    b, c, h, w = out.shape
    nhwc = _channels_last(out)
    result = out.clone(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    if index.numel() and c:
        br, bc = _tile(c)
        grid = (triton.cdiv(index.numel(), br), triton.cdiv(c, bc))
        _scatter_kernel[grid](rows.contiguous(), index, result, index.numel(), c, h * w, ADD=mode == 1, NHWC=nhwc,
                              BR=br, BC=bc)  # fmt: skip
    return result


def _compute(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


@triton.jit
def _tap_depthwise_kernel(src_ptr, table_ptr, w_ptr, bias_ptr, valid_ptr, out_ptr, P, C, TAPS,
                          HAS_BIAS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    r_in, c_in = rows < P, cols < C
    acc = tl.zeros([BR, BC], ACC)
    for t in range(TAPS):
        q = tl.load(table_ptr + rows * TAPS + t, mask=r_in, other=-1)
        ok = ((q >= 0) & r_in)[:, None] & c_in[None, :]
        v = tl.load(src_ptr + tl.maximum(q, 0)[:, None] * C + cols[None, :], mask=ok, other=0.0).to(ACC)
        wt = tl.load(w_ptr + t * C + cols, mask=c_in, other=0.0).to(ACC)
        acc += v * wt[None, :]
    if HAS_BIAS:
        valid = tl.load(valid_ptr + rows, mask=r_in, other=-1) >= 0
        bias = tl.load(bias_ptr + cols, mask=c_in, other=0.0).to(ACC)
        acc += tl.where(valid[:, None], bias[None, :], 0.0)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_in[:, None] & c_in[None, :])  # fmt: skip


def tap_depthwise(src, table, weight_tc, bias=None, valid=None):
    """out (rows, C): sum over taps of weight_tc[t] * src[table[:, t]] (+ bias where valid >= 0)."""
    p, taps = table.shape
    c = src.shape[1]
    out = torch.empty((p, c), dtype=src.dtype, device=src.device)
    if out.numel():
        br, bc = _tile(c)
        grid = (triton.cdiv(p, br), triton.cdiv(c, bc))
        _tap_depthwise_kernel[grid](src.contiguous(), table.contiguous(), weight_tc.contiguous(),
                                    src if bias is None else bias.contiguous(), table if valid is None else valid,
                                    out, p, c, taps, HAS_BIAS=bias is not None, BR=br, BC=bc,
                                    ACC=_compute(src))  # fmt: skip
    return out


@triton.jit
def _tap_depthwise_wgrad_kernel(src_ptr, table_ptr, grad_ptr, out_ptr, P, C, TAPS,
                                BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    c_in = cols < C
    acc = tl.zeros([BC], ACC)
    for r0 in range(0, P, BR):
        rows = r0 + tl.arange(0, BR).to(tl.int64)
        r_in = rows < P
        q = tl.load(table_ptr + rows * TAPS + t, mask=r_in, other=-1)
        ok = ((q >= 0) & r_in)[:, None] & c_in[None, :]
        v = tl.load(src_ptr + tl.maximum(q, 0)[:, None] * C + cols[None, :], mask=ok, other=0.0).to(ACC)
        g = tl.load(grad_ptr + rows[:, None] * C + cols[None, :], mask=r_in[:, None] & c_in[None, :], other=0.0)
        acc += tl.sum(v * g.to(ACC), axis=0)
    tl.store(out_ptr + t * C + cols, acc.to(out_ptr.dtype.element_ty), mask=c_in)


def tap_depthwise_wgrad(src, table, grad):
    """(taps, C): sum over rows r of src[table[r, t]] * grad[r]."""
    p, taps = table.shape
    c = src.shape[1]
    out = torch.zeros((taps, c), dtype=src.dtype, device=src.device)
    if p and c:
        br, bc = _tile(c)
        _tap_depthwise_wgrad_kernel[(taps, triton.cdiv(c, bc))](src.contiguous(), table.contiguous(),
                                                                 grad.contiguous(), out, p, c, taps, BR=br, BC=bc,
                                                                 ACC=_compute(src))  # fmt: skip
    return out


@triton.jit
def _tap_gemm_kernel(src_ptr, table_ptr, w_ptr, bias_ptr, valid_ptr, out_ptr, P, K, N, TAPS, HAS_BIAS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    r_in, c_in = rows < P, cols < N
    acc = tl.zeros([BM, BN], ACC)
    for t in range(TAPS):
        q = tl.load(table_ptr + rows * TAPS + t, mask=r_in, other=-1)
        q_ok = (q >= 0) & r_in
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_in = ks < K
            a = tl.load(src_ptr + tl.maximum(q, 0)[:, None] * K + ks[None, :], mask=q_ok[:, None] & k_in[None, :],
                        other=0.0)  # fmt: skip
            b = tl.load(w_ptr + (t * K + ks)[:, None].to(tl.int64) * N + cols[None, :],
                        mask=k_in[:, None] & c_in[None, :], other=0.0)  # fmt: skip
            acc += tl.dot(a, b, input_precision="ieee", out_dtype=ACC)
    if HAS_BIAS:
        valid = tl.load(valid_ptr + rows, mask=r_in, other=-1) >= 0
        bias = tl.load(bias_ptr + cols, mask=c_in, other=0.0).to(ACC)
        acc += tl.where(valid[:, None], bias[None, :], 0.0)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_in[:, None] & c_in[None, :])  # fmt: skip


def _dot_block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))  # tl.dot needs every dimension >= 16


def tap_gemm(src, table, weight_kn, bias=None, valid=None):
    """out (rows, N) = sum over taps t of src[table[:, t]] @ weight_kn[t*K:(t+1)*K] (+ bias where valid >= 0)."""
    p, taps = table.shape
    k = src.shape[1]
    n = weight_kn.shape[1]
    out = torch.empty((p, n), dtype=src.dtype, device=src.device)
    if out.numel():
        bm, bn, bk = _dot_block(p, 64), _dot_block(n, 64), _dot_block(k, 32)
        grid = (triton.cdiv(p, bm), triton.cdiv(n, bn))
        _tap_gemm_kernel[grid](src.contiguous(), table.contiguous(), weight_kn.contiguous(),
                               src if bias is None else bias.contiguous(), table if valid is None else valid, out,
                               p, k, n, taps, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk,
                               ACC=_compute(src))  # fmt: skip
    return out


@triton.jit
def _tap_gemm_wgrad_kernel(src_ptr, table_ptr, grad_ptr, out_ptr, P, K, N, TAPS,
                           BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    ks = tl.program_id(1) * BK + tl.arange(0, BK)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    k_in, c_in = ks < K, cols < N
    acc = tl.zeros([BK, BN], ACC)
    for r0 in range(0, P, BR):
        rows = r0 + tl.arange(0, BR).to(tl.int64)
        r_in = rows < P
        q = tl.load(table_ptr + rows * TAPS + t, mask=r_in, other=-1)
        q_ok = (q >= 0) & r_in
        a = tl.load(src_ptr + tl.maximum(q, 0)[None, :] * K + ks[:, None], mask=k_in[:, None] & q_ok[None, :],
                    other=0.0)  # fmt: skip
        g = tl.load(grad_ptr + rows[:, None] * N + cols[None, :], mask=r_in[:, None] & c_in[None, :], other=0.0)
        acc += tl.dot(a, g, input_precision="ieee", out_dtype=ACC)
    tl.store(out_ptr + (t * K + ks)[:, None].to(tl.int64) * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=k_in[:, None] & c_in[None, :])  # fmt: skip


def tap_gemm_wgrad(src, table, grad):
    """(taps * K, N): block t is sum over rows r of src[table[r, t]]^T grad[r]."""
    p, taps = table.shape
    k, n = src.shape[1], grad.shape[1]
    out = torch.zeros((taps * k, n), dtype=src.dtype, device=src.device)
    if p and k and n:
        bk, bn = _dot_block(k, 32), _dot_block(n, 64)
        grid = (taps, triton.cdiv(k, bk), triton.cdiv(n, bn))
        _tap_gemm_wgrad_kernel[grid](src.contiguous(), table.contiguous(), grad.contiguous(), out, p, k, n, taps,
                                     BK=bk, BN=bn, BR=32, ACC=_compute(src))  # fmt: skip
    return out
