"""Triton kernels of Auto Seg-Loss's region surrogates (issue 17): the same two
passes as csrc/auto_seg_loss/surrogate_stats_cpu.cpp (see there for the
formulas).

* ``surrogate_stats``: one program per (image, block of BP pixels) holds the
  (classes x pixels) tile of logits, takes the softmax over classes in
  registers, evaluates the curves and writes its own (3, C) partial sums;
  the partials are then added by one torch.sum (a fixed tree: deterministic,
  no atomics).
* ``surrogate_stats_backward``: the same tile, recomputed, gives
  dz_c = s_c (g_c - sum_k s_k g_k) with g from the (3, C) gradient.

Curves come as tables (M, 7) of A_x, A_y, q, Q_y, B_x, B_y, 1 / (B_x - A_x) per
piece (built once per call from theta, a few numbers copied to the device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _curve(x, tab_ptr, PIECES: tl.constexpr, NEED_SLOPE: tl.constexpr):
    """h(x) and h'(x) of the piecewise quadratic Bezier curve (the official
    piece choice: later pieces where x > A_x)."""
    zero = tl.zeros_like(x)
    ax = zero + tl.load(tab_ptr + 0).to(x.dtype)
    ay = zero + tl.load(tab_ptr + 1).to(x.dtype)
    q = zero + tl.load(tab_ptr + 2).to(x.dtype)
    qy = zero + tl.load(tab_ptr + 3).to(x.dtype)
    bx = zero + tl.load(tab_ptr + 4).to(x.dtype)
    by = zero + tl.load(tab_ptr + 5).to(x.dtype)
    inv = zero + tl.load(tab_ptr + 6).to(x.dtype)
    for k in tl.static_range(1, PIECES):
        kx = tl.load(tab_ptr + 7 * k).to(x.dtype)
        inside = x > kx
        ax = tl.where(inside, kx, ax)
        ay = tl.where(inside, tl.load(tab_ptr + 7 * k + 1).to(x.dtype), ay)
        q = tl.where(inside, tl.load(tab_ptr + 7 * k + 2).to(x.dtype), q)
        qy = tl.where(inside, tl.load(tab_ptr + 7 * k + 3).to(x.dtype), qy)
        bx = tl.where(inside, tl.load(tab_ptr + 7 * k + 4).to(x.dtype), bx)
        by = tl.where(inside, tl.load(tab_ptr + 7 * k + 5).to(x.dtype), by)
        inv = tl.where(inside, tl.load(tab_ptr + 7 * k + 6).to(x.dtype), inv)
    xn = (x - ax) * inv
    d = q * q + (1.0 - 2.0 * q) * xn
    root = tl.sqrt(tl.maximum(d, 0.0))
    den = q + root
    t = tl.where(den > 0, xn / tl.where(den > 0, den, 1.0), 0.0)
    t = tl.where(x >= bx, 1.0, t)  # exactly 1 at the piece's end
    u = 1.0 - t
    y = u * (u * ay + 2.0 * t * qy) + t * t * by  # Bernstein form: h(0) = 0, h(1) = 1 exactly
    slope = zero
    if NEED_SLOPE:
        dydt = 2.0 * u * (qy - ay) + 2.0 * t * (by - qy)
        slope = tl.where(root > 0, dydt * inv / (2.0 * tl.where(root > 0, root, 1.0)), 0.0)
    return y, slope


@triton.jit
def _tile(z_ptr, l_ptr, r_ptr, img, pix0, C, HW, IGNORE, HAS_REGION: tl.constexpr, BC: tl.constexpr,
          BP: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """softmax s (BC, BP), masks own / other (pixel's class / another class at
    a kept pixel), and the tile's offsets and load mask."""
    cls = tl.arange(0, BC)
    pix = pix0 + tl.arange(0, BP)
    cmask, pmask = cls < C, pix < HW
    inside = cmask[:, None] & pmask[None, :]
    offs = img * C * HW + cls[:, None].to(tl.int64) * HW + pix[None, :]
    z = tl.load(z_ptr + offs, mask=inside, other=0.0).to(ACC)
    z = tl.where(cmask[:, None], z, float("-inf"))
    e = tl.exp(z - tl.max(z, axis=0)[None, :])
    s = e / tl.sum(e, axis=0)[None, :]
    label = tl.load(l_ptr + img * HW + pix, mask=pmask, other=-1).to(tl.int32)
    keep = pmask & (label >= 0) & (label < C) & (label != IGNORE)
    if HAS_REGION:
        keep = keep & (tl.load(r_ptr + img * HW + pix, mask=pmask, other=0) != 0)
    own = (cls[:, None] == label[None, :]) & keep[None, :]
    other = cmask[:, None] & keep[None, :] & (cls[:, None] != label[None, :])
    return s, own, other, offs, inside


@triton.jit
def _stats_kernel(z_ptr, l_ptr, r_ptr, t1_ptr, t2_ptr, out_ptr, C, HW, IGNORE, HAS_REGION: tl.constexpr,
                  PIECES1: tl.constexpr, PIECES2: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
                  ACC: tl.constexpr):  # fmt: skip
    img = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    s, own, other, offs, inside = _tile(z_ptr, l_ptr, r_ptr, img, blk * BP, C, HW, IGNORE, HAS_REGION, BC, BP, ACC)
    h1, _ = _curve(s, t1_ptr, PIECES1, False)
    inter = tl.sum(tl.where(own, h1, 0.0), axis=1)
    count = tl.sum(own.to(ACC), axis=1)
    rest = tl.zeros_like(inter)
    if PIECES2 > 0:
        h2, _ = _curve(s, t2_ptr, PIECES2, False)
        rest = tl.sum(tl.where(other, h2, 0.0), axis=1)
    cls = tl.arange(0, BC)
    base = out_ptr + (img * tl.num_programs(1) + blk) * 3 * C
    tl.store(base + cls, inter, mask=cls < C)
    tl.store(base + C + cls, rest, mask=cls < C)
    tl.store(base + 2 * C + cls, count, mask=cls < C)


@triton.jit
def _stats_backward_kernel(g_ptr, z_ptr, l_ptr, r_ptr, t1_ptr, t2_ptr, out_ptr, C, HW, IGNORE,
                           HAS_REGION: tl.constexpr, PIECES1: tl.constexpr, PIECES2: tl.constexpr, BC: tl.constexpr,
                           BP: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    img = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    s, own, other, offs, inside = _tile(z_ptr, l_ptr, r_ptr, img, blk * BP, C, HW, IGNORE, HAS_REGION, BC, BP, ACC)
    cls = tl.arange(0, BC)
    g_inter = tl.load(g_ptr + cls, mask=cls < C, other=0.0).to(ACC)
    _, slope1 = _curve(s, t1_ptr, PIECES1, True)
    g = tl.where(own, g_inter[:, None] * slope1, 0.0)
    if PIECES2 > 0:
        g_rest = tl.load(g_ptr + C + cls, mask=cls < C, other=0.0).to(ACC)
        _, slope2 = _curve(s, t2_ptr, PIECES2, True)
        g += tl.where(other, g_rest[:, None] * slope2, 0.0)
    dot = tl.sum(s * g, axis=0)
    dz = s * (g - dot[None, :])
    tl.store(out_ptr + offs, dz.to(out_ptr.dtype.element_ty), mask=inside)


def _acc(logits: torch.Tensor):
    return (torch.float64, tl.float64) if logits.dtype == torch.float64 else (torch.float32, tl.float32)


def _launch_args(logits, target, region, theta_i, theta_u):
    from dynkernels.ops.auto_seg_loss import _piece_table  # the one table builder (lazy: no import cycle)

    acc, _ = _acc(logits)
    like = torch.empty(0, dtype=acc, device=logits.device)
    t1 = _piece_table(theta_i.tolist(), like)
    t2 = _piece_table(theta_u.tolist(), like) if theta_u.numel() else t1
    n, c, h, w = logits.shape
    bc = triton.next_power_of_2(c)
    bp = max(16, min(128, 4096 // bc))
    region_arg = region.contiguous() if region is not None else target
    return t1, t2, region_arg, (n, triton.cdiv(h * w, bp)), bc, bp


def surrogate_stats(logits, target, region, theta_i, theta_u, ignore_index: int) -> torch.Tensor:
    acc, acc_tl = _acc(logits)
    n, c, h, w = logits.shape
    t1, t2, region_arg, grid, bc, bp = _launch_args(logits, target, region, theta_i, theta_u)
    partial = torch.zeros((grid[0] * grid[1], 3, c), dtype=acc, device=logits.device)
    if logits.numel():
        _stats_kernel[grid](logits.contiguous(), target.contiguous(), region_arg, t1, t2, partial, c, h * w,
                            ignore_index, HAS_REGION=region is not None, PIECES1=t1.shape[0],
                            PIECES2=t2.shape[0] if theta_u.numel() else 0, BC=bc, BP=bp, ACC=acc_tl)  # fmt: skip
    return partial.sum(0)


def surrogate_stats_backward(grad, logits, target, region, theta_i, theta_u, ignore_index: int) -> torch.Tensor:
    acc, acc_tl = _acc(logits)
    n, c, h, w = logits.shape
    t1, t2, region_arg, grid, bc, bp = _launch_args(logits, target, region, theta_i, theta_u)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.numel():
        _stats_backward_kernel[grid](grad.to(acc).contiguous(), logits.contiguous(), target.contiguous(), region_arg,
                                     t1, t2, out, c, h * w, ignore_index, HAS_REGION=region is not None,
                                     PIECES1=t1.shape[0], PIECES2=t2.shape[0] if theta_u.numel() else 0, BC=bc,
                                     BP=bp, ACC=acc_tl)  # fmt: skip
    return out
