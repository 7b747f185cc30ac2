"""Triton kernels of dynamic convolution (issue 13): implicit GEMMs that mix
the K expert kernels on the fly.

For sample b and group g, with R = Cin/g * kh * kw reduction indices
r = (c, i, j) and the folded kernel

    Kt_b[o, r] = a_f,b[o] * a_c,b[g Cin/g + c] * a_s,b[i, j] * Σ_k pi_bk W_k[o, c, i, j],

* ``_forward_kernel``: y_b[o, p] = Σ_r Kt_b[o, r] X_b[r, p] + Σ_k pi_bk bias_k[o],
  one (pixels x filters) tile per program; each reduction step loads the K
  expert tiles and mixes them in registers (the per-sample kernels are never
  written to memory), the tap and channel scales scale the mixed tile's
  rows, the filter scale and the routed bias are the epilogue.
* ``_grad_input_kernel``: dx_b[c, q] = Σ_(o, i, j) Kt_b[o, c, i, j] dy_b[o, p(q, i, j)],
  the transposed implicit GEMM over the output taps that land on input
  pixel q (stride, padding and dilation by masks), the same on-the-fly mix.
* ``_grad_kernel_kernel``: G_b[o, r] = Σ_p dy_b[o, p] X_b[r, p], the gradient
  of the folded kernel, one (filters x r) tile per program reducing over
  every output pixel in a fixed order: deterministic, no atomics.

x, y and dy are addressed by their strides, so channels-last and
channels-first tensors run without a copy. Accumulation is float32
(float64 for float64 inputs); float16/bfloat16 operands go to tl.dot in
their own type, float32 ones with IEEE precision (no TF32)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["forward", "backward"]


@triton.jit
def _mixed_tile(w_ptr, pi_ptr, b, EXPERTS, expert_stride, offs, ok, COMPUTE: tl.constexpr):
    """Σ_k pi_bk W_k[offs] for a tile of flat offsets into one expert."""
    tile = tl.zeros(offs.shape, dtype=COMPUTE)
    for k in range(EXPERTS):
        p = tl.load(pi_ptr + b * EXPERTS + k).to(COMPUTE)
        tile += p * tl.load(w_ptr + k * expert_stride + offs, mask=ok, other=0.0).to(COMPUTE)
    return tile


@triton.jit
def _dot(a, b, COMPUTE: tl.constexpr, OPERAND: tl.constexpr):
    if OPERAND == tl.float16 or OPERAND == tl.bfloat16:
        return tl.dot(a.to(OPERAND), b.to(OPERAND), out_dtype=COMPUTE)
    return tl.dot(a, b, input_precision="ieee", out_dtype=COMPUTE)


@triton.jit
def _input_tile(x_ptr, b, first, c, tap, oh, ow, pix_ok, r_ok, H, W, sxb, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW,
                KW: tl.constexpr, COMPUTE: tl.constexpr):  # fmt: skip
    """The implicit im2col tile X[p, r]: rows the output pixels (oh, ow),
    columns the reduction indices (channel first + c, tap), zero off the input."""
    ih = oh[:, None] * SH - PH + (tap // KW)[None, :] * DH
    iw = ow[:, None] * SW - PW + (tap % KW)[None, :] * DW
    ok = pix_ok[:, None] & r_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x_off = b * sxb + (first + c)[None, :] * sxc + ih * sxh + iw * sxw
    return tl.load(x_ptr + x_off, mask=ok, other=0.0).to(COMPUTE)


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, pi_ptr, bias_ptr, cs_ptr, fs_ptr, ks_ptr, y_ptr,
    H, W, HO, WO, CG, COG, GROUPS, EXPERTS,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_CS: tl.constexpr, HAS_FS: tl.constexpr, HAS_KS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr, OPERAND: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, pid_bg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, grp = pid_bg // GROUPS, pid_bg % GROUPS
    taps = KH * KW
    red = CG * taps
    cout = COG * GROUPS
    pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pix_ok = pix < HO * WO
    oh, ow = pix // WO, pix % WO
    fil = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    fil_ok = fil < COG
    co = grp * COG + fil
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    for r0 in range(0, red, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        r_ok = r < red
        c, tap = r // taps, r % taps
        xt = _input_tile(
            x_ptr,
            b,
            grp * CG,
            c,
            tap,
            oh,
            ow,
            pix_ok,
            r_ok,
            H,
            W,
            sxb,
            sxc,
            sxh,
            sxw,
            SH,
            SW,
            PH,
            PW,
            DH,
            DW,
            KW,
            COMPUTE,
        )
        w_ok = r_ok[:, None] & fil_ok[None, :]
        wt = _mixed_tile(w_ptr, pi_ptr, b, EXPERTS, cout * red, co[None, :] * red + r[:, None], w_ok, COMPUTE)
        if HAS_KS:
            wt *= tl.load(ks_ptr + b * taps + tap, mask=r_ok, other=0.0).to(COMPUTE)[:, None]
        if HAS_CS:
            wt *= tl.load(cs_ptr + b * CG * GROUPS + grp * CG + c, mask=r_ok, other=0.0).to(COMPUTE)[:, None]
        acc += _dot(xt, wt, COMPUTE, OPERAND)
    if HAS_FS:
        acc *= tl.load(fs_ptr + b * cout + co, mask=fil_ok, other=0.0).to(COMPUTE)[None, :]
    if HAS_BIAS:
        acc += _mixed_tile(bias_ptr, pi_ptr, b, EXPERTS, cout, co, fil_ok, COMPUTE)[None, :]
    y_off = b * syb + co[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=pix_ok[:, None] & fil_ok[None, :])


@triton.jit
def _grad_input_kernel(
    g_ptr, w_ptr, pi_ptr, cs_ptr, fs_ptr, ks_ptr, dx_ptr,
    H, W, HO, WO, CG, COG, GROUPS, EXPERTS,
    sgb, sgc, sgh, sgw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_CS: tl.constexpr, HAS_FS: tl.constexpr, HAS_KS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr, OPERAND: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, pid_bg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, grp = pid_bg // GROUPS, pid_bg % GROUPS
    taps = KH * KW
    red = COG * taps
    cout = COG * GROUPS
    pix = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pix_ok = pix < H * W
    ih, iw = pix // W, pix % W
    ch = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ch_ok = ch < CG
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    for r0 in range(0, red, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        r_ok = r < red
        o, tap = grp * COG + r // taps, r % taps
        # the output pixel whose tap (i, j) reads input pixel (ih, iw), where one does
        nh = ih[:, None] + PH - (tap // KW)[None, :] * DH
        nw = iw[:, None] + PW - (tap % KW)[None, :] * DW
        nh_pos, nw_pos = tl.where(nh >= 0, nh, 0), tl.where(nw >= 0, nw, 0)
        oh, ow = nh_pos // SH, nw_pos // SW
        ok = pix_ok[:, None] & r_ok[None, :] & (nh >= 0) & (nw >= 0)
        ok = ok & (nh_pos % SH == 0) & (nw_pos % SW == 0) & (oh < HO) & (ow < WO)
        gt = tl.load(g_ptr + b * sgb + o[None, :] * sgc + oh * sgh + ow * sgw, mask=ok, other=0.0).to(COMPUTE)
        w_ok = r_ok[:, None] & ch_ok[None, :]
        w_off = o[:, None] * (CG * taps) + ch[None, :] * taps + tap[:, None]
        wt = _mixed_tile(w_ptr, pi_ptr, b, EXPERTS, cout * CG * taps, w_off, w_ok, COMPUTE)
        if HAS_KS:
            wt *= tl.load(ks_ptr + b * taps + tap, mask=r_ok, other=0.0).to(COMPUTE)[:, None]
        if HAS_FS:
            wt *= tl.load(fs_ptr + b * cout + o, mask=r_ok, other=0.0).to(COMPUTE)[:, None]
        acc += _dot(gt, wt, COMPUTE, OPERAND)
    cin = grp * CG + ch
    if HAS_CS:
        acc *= tl.load(cs_ptr + b * CG * GROUPS + cin, mask=ch_ok, other=0.0).to(COMPUTE)[None, :]
    dx_off = (b * CG * GROUPS + cin[None, :]) * (H * W) + pix[:, None]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=pix_ok[:, None] & ch_ok[None, :])


@triton.jit
def _grad_kernel_kernel(
    g_ptr, x_ptr, gk_ptr,
    H, W, HO, WO, CG, COG, GROUPS,
    sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr, OPERAND: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, pid_bg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, grp = pid_bg // GROUPS, pid_bg % GROUPS
    taps = KH * KW
    red = CG * taps
    fil = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    fil_ok = fil < COG
    co = grp * COG + fil
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < red
    c, tap = r // taps, r % taps
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    for p0 in range(0, HO * WO, BLOCK_K):
        pix = p0 + tl.arange(0, BLOCK_K)
        pix_ok = pix < HO * WO
        oh, ow = pix // WO, pix % WO
        g_off = b * sgb + co[:, None] * sgc + oh[None, :] * sgh + ow[None, :] * sgw
        gt = tl.load(g_ptr + g_off, mask=fil_ok[:, None] & pix_ok[None, :], other=0.0).to(COMPUTE)
        xt = _input_tile(
            x_ptr,
            b,
            grp * CG,
            c,
            tap,
            oh,
            ow,
            pix_ok,
            r_ok,
            H,
            W,
            sxb,
            sxc,
            sxh,
            sxw,
            SH,
            SW,
            PH,
            PW,
            DH,
            DW,
            KW,
            COMPUTE,
        )
        acc += _dot(gt, xt, COMPUTE, OPERAND)
    gk_off = (b * COG * GROUPS + co[:, None]) * red + r[None, :]
    tl.store(gk_ptr + gk_off, acc.to(gk_ptr.dtype.element_ty), mask=fil_ok[:, None] & r_ok[None, :])


def _types(x: torch.Tensor):
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32
    operand = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(x.dtype, compute)
    return dict(COMPUTE=compute, OPERAND=operand)


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))  # tl.dot needs every dimension >= 16


def _optional(t, stand_in):
    return t.contiguous() if t is not None else stand_in


def _geometry(stride, padding, dilation):
    return (*stride, *padding, *dilation)


def forward(x, weight, routing, bias, in_scale, out_scale, kernel_scale, stride, padding, dilation, groups):
    """y (B, Cout, Ho, Wo), in x's memory format."""
    batch, cin, h, w = x.shape
    experts, cout, cg, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty((batch, cout, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    weight, routing = weight.contiguous(), routing.contiguous()
    cog = cout // groups
    meta = dict(BLOCK_M=_block(ho * wo, 64), BLOCK_N=_block(cog, 64), BLOCK_K=_block(cg * kh * kw, 32), **_types(x))
    grid = (triton.cdiv(ho * wo, meta["BLOCK_M"]), triton.cdiv(cog, meta["BLOCK_N"]), batch * groups)
    _forward_kernel[grid](
        x, weight, routing, _optional(bias, weight), _optional(in_scale, weight), _optional(out_scale, weight),
        _optional(kernel_scale, weight), y,
        h, w, ho, wo, cg, cog, groups, experts,
        *x.stride(), *y.stride(), *_geometry(stride, padding, dilation),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_CS=in_scale is not None, HAS_FS=out_scale is not None,
        HAS_KS=kernel_scale is not None, **meta,
    )  # fmt: skip
    return y


def backward(grad, x, weight, routing, in_scale, out_scale, kernel_scale, stride, padding, dilation, groups):
    """(dx (B, Cin, H, W), G (B, Cout, Cin/g, kh, kw)): the input gradient and
    the gradient of the folded per-sample kernels; G is in the compute dtype
    (float32 for half inputs) for the reductions the caller makes of it."""
    batch, cin, h, w = x.shape
    experts, cout, cg, kh, kw = weight.shape
    ho, wo = grad.shape[-2:]
    cog = cout // groups
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = torch.empty((batch, cin, h, w), dtype=x.dtype, device=x.device)
    gk = torch.empty((batch, cout, cg, kh, kw), dtype=compute, device=x.device)
    if batch == 0 or grad.numel() == 0:
        return dx.zero_(), gk.zero_()
    weight, routing = weight.contiguous(), routing.contiguous()
    geo = _geometry(stride, padding, dilation)
    types = _types(x)
    meta = dict(BLOCK_M=_block(h * w, 64), BLOCK_N=_block(cg, 64), BLOCK_K=_block(cog * kh * kw, 32), **types)
    grid = (triton.cdiv(h * w, meta["BLOCK_M"]), triton.cdiv(cg, meta["BLOCK_N"]), batch * groups)
    _grad_input_kernel[grid](
        grad, weight, routing, _optional(in_scale, weight), _optional(out_scale, weight),
        _optional(kernel_scale, weight), dx,
        h, w, ho, wo, cg, cog, groups, experts, *grad.stride(), *geo,
        KH=kh, KW=kw, HAS_CS=in_scale is not None, HAS_FS=out_scale is not None, HAS_KS=kernel_scale is not None,
        **meta,
    )  # fmt: skip
    red = cg * kh * kw
    meta = dict(BLOCK_M=_block(cog, 64), BLOCK_N=_block(red, 64), BLOCK_K=_block(ho * wo, 64), **types)
    grid = (triton.cdiv(cog, meta["BLOCK_M"]), triton.cdiv(red, meta["BLOCK_N"]), batch * groups)
    _grad_kernel_kernel[grid](
        grad, x, gk, h, w, ho, wo, cg, cog, groups, *grad.stride(), *x.stride(), *geo, KH=kh, KW=kw, **meta
    )  # fmt: skip
    return dx, gk
