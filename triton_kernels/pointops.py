"""Triton kernels for the point-cloud gather ops (grouping_operation, gather_points).

Naming ladder: ``_gather_features_fwd_kernel`` (jit) -> ``gather_features_fwd``
(launcher) -> ``dynkernels.ops.grouping_operation`` / ``gather_points``.

Shapes: features (B, C, N), idx (B, K) int32/int64 with -1 meaning "no point",
out (B, C, K). Launchers take any strides and make inputs contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_features_fwd_kernel(features_ptr, idx_ptr, out_ptr, C, N, K, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_in = ks < K
    idx = tl.load(idx_ptr + b * K + ks, mask=k_in, other=-1).to(tl.int64)
    tl.device_assert((idx >= -1) & (idx < N), "gather_features: idx outside [-1, N)")
    valid = idx >= 0
    rows = (b * C + cs.to(tl.int64))[:, None]
    m = (cs[:, None] < C) & k_in[None, :]
    vals = tl.load(features_ptr + rows * N + idx[None, :], mask=m & valid[None, :], other=0.0)
    tl.store(out_ptr + rows * K + ks[None, :], vals, mask=m)


@triton.jit
def _gather_features_bwd_atomic_kernel(
    grad_out_ptr, idx_ptr, grad_ptr, C, N, K, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_in = ks < K
    idx = tl.load(idx_ptr + b * K + ks, mask=k_in, other=-1).to(tl.int64)
    valid = idx >= 0
    rows = (b * C + cs.to(tl.int64))[:, None]
    m = (cs[:, None] < C) & k_in[None, :]
    g = tl.load(grad_out_ptr + rows * K + ks[None, :], mask=m, other=0.0)
    tl.atomic_add(grad_ptr + rows * N + idx[None, :], g.to(grad_ptr.dtype.element_ty), mask=m & valid[None, :])


@triton.jit
def _gather_features_bwd_segment_kernel(
    grad_out_ptr, order_ptr, offsets_ptr, grad_ptr, C, N, K, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr
):
    # One program per (point, channel block): sums its CSR segment in a fixed
    # order (ascending k), so the result does not depend on scheduling.
    seg = tl.program_id(0).to(tl.int64)  # b * N + n
    b = seg // N
    n = seg % N
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    start = tl.load(offsets_ptr + seg)
    stop = tl.load(offsets_ptr + seg + 1)
    rows = b * C + cs.to(tl.int64)
    acc = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for j in range(start, stop):
        k = tl.load(order_ptr + j) - b * K
        acc += tl.load(grad_out_ptr + rows * K + k, mask=c_in, other=0.0).to(ACC_DTYPE)
    tl.store(grad_ptr + rows * N + n, acc.to(grad_ptr.dtype.element_ty), mask=c_in)


def _blocks(channels: int) -> tuple[int, int]:
    block_c = min(32, triton.next_power_of_2(max(channels, 1)))
    return block_c, 128


def gather_features_fwd(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    features, idx = features.contiguous(), idx.contiguous()
    batch, channels, n = features.shape
    k = idx.shape[1]
    out = torch.empty((batch, channels, k), dtype=features.dtype, device=features.device)
    if out.numel() == 0:
        return out
    block_c, block_k = _blocks(channels)
    grid = (batch, triton.cdiv(channels, block_c), triton.cdiv(k, block_k))
    _gather_features_fwd_kernel[grid](features, idx, out, channels, n, k, BLOCK_C=block_c, BLOCK_K=block_k)
    return out


def segment_order(idx: torch.Tensor, num_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of idx (B, K) by target point, from the shared substrate's stable
    sort (dynkernels.ops.sort_segments): (order, offsets) with the flat
    positions b*K + k of each point's uses in ascending k, and offsets of
    length B*N + 1. Entries -1 are left out."""
    from dynkernels.ops.segment import sort_segments

    batch = idx.shape[0]
    base = torch.arange(batch, device=idx.device, dtype=torch.int64).unsqueeze(1) * num_points
    keys = torch.where(idx >= 0, idx.to(torch.int64) + base, -1).reshape(-1)
    segments = sort_segments(keys, batch * num_points)
    return segments.perm, segments.offsets


def gather_features_bwd(
    grad_out: torch.Tensor, idx: torch.Tensor, num_points: int, deterministic: bool
) -> torch.Tensor:
    grad_out, idx = grad_out.contiguous(), idx.contiguous()
    batch, channels, k = grad_out.shape
    n = num_points
    block_c, block_k = _blocks(channels)
    if grad_out.numel() == 0 or n == 0:
        return torch.zeros((batch, channels, n), dtype=grad_out.dtype, device=grad_out.device)
    if deterministic:
        order, offsets = segment_order(idx, n)
        grad = torch.empty((batch, channels, n), dtype=grad_out.dtype, device=grad_out.device)
        grid = (batch * n, triton.cdiv(channels, block_c))
        acc = tl.float64 if grad_out.dtype == torch.float64 else tl.float32
        _gather_features_bwd_segment_kernel[grid](
            grad_out, order, offsets, grad, channels, n, k, BLOCK_C=block_c, ACC_DTYPE=acc
        )
        return grad
    # Atomics accumulate in fp32 for half types, then round once.
    acc_dtype = torch.float32 if grad_out.dtype in (torch.float16, torch.bfloat16) else grad_out.dtype
    grad = torch.zeros((batch, channels, n), dtype=acc_dtype, device=grad_out.device)
    grid = (batch, triton.cdiv(channels, block_c), triton.cdiv(k, block_k))
    _gather_features_bwd_atomic_kernel[grid](grad_out, idx, grad, channels, n, k, BLOCK_C=block_c, BLOCK_K=block_k)
    return grad.to(grad_out.dtype)
