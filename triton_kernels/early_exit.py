"""Triton kernels of the early-exit family (issue 16): GFNet's focus patches.

* ``crop_patches``: out[s, c, y, x] = img[r_s, c, oy_s + y, ox_s + x] with r_s
  = index[s] (default s), one
  block of output elements per program in the output's memory order (NCHW,
  or channels-last (b, y, x, c)); each element reads its sample's two
  actions (cached) and computes the window offset itself,
  ``floor(a * (S - P))`` in the actions' dtype (the official product),
  clamped into the image.
* ``crop_patches_backward``: one pass over the image gradient: the patch
  gradient inside the window, zero elsewhere (windows of different samples
  never meet: no atomics).

A copy: no arithmetic on the pixels, so every dtype the interpreter and the
GPU load is exact."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["crop_patches", "crop_patches_backward"]

_BLOCK = 1024


@triton.jit
def _offset(a_ptr, b, axis, span, ok):
    a = tl.load(a_ptr + b * 2 + axis, mask=ok, other=0)
    v = tl.floor((a * span.to(a.dtype)).to(tl.float64))  # the product rounded to the actions' dtype, floored
    v = tl.where(v >= 0, v, 0.0)  # a NaN fails the test: 0
    v = tl.minimum(v, span.to(tl.float64))
    return v.to(tl.int64)


@triton.jit
def _decompose(i, C, Y, X, CL: tl.constexpr):
    # flat index in the memory order -> (b, c, y, x)
    if CL:
        c = i % C
        x = (i // C) % X
        y = (i // (C * X)) % Y
        b = i // (C * X * Y)
    else:
        x = i % X
        y = (i // X) % Y
        c = (i // (X * Y)) % C
        b = i // (X * Y * C)
    return b, c, y, x


@triton.jit
def _index(b, c, y, x, C, Y, X, CL: tl.constexpr):
    if CL:
        return ((b * Y + y) * X + x) * C + c
    return ((b * C + c) * Y + y) * X + x


@triton.jit
def _crop_kernel(
    img_ptr, a_ptr, idx_ptr, out_ptr, total, C, H, W, P, INDEXED: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    b, c, y, x = _decompose(i, C, P, P, CL)
    oy = _offset(a_ptr, b, 0, H - P, ok)
    ox = _offset(a_ptr, b, 1, W - P, ok)
    if INDEXED:
        img = tl.load(idx_ptr + b, mask=ok, other=0)
    else:
        img = b
    v = tl.load(img_ptr + _index(img, c, oy + y, ox + x, C, H, W, CL), mask=ok)
    tl.store(out_ptr + i, v, mask=ok)


@triton.jit
def _crop_backward_kernel(
    g_ptr, a_ptr, idx_ptr, out_ptr, total, C, H, W, P, INDEXED: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    b, c, y, x = _decompose(i, C, H, W, CL)
    oy = _offset(a_ptr, b, 0, H - P, ok)
    ox = _offset(a_ptr, b, 1, W - P, ok)
    inside = ok & (y >= oy) & (y < oy + P) & (x >= ox) & (x < ox + P)
    v = tl.load(g_ptr + _index(b, c, y - oy, x - ox, C, P, P, CL), mask=inside, other=0)
    tl.store(out_ptr + i, v, mask=ok)


def _channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _launch(kernel, src, actions, index, shape, h: int, w: int, p: int) -> torch.Tensor:
    cl = _channels_last(src)
    src = src if cl else src.contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    out = torch.empty(shape, dtype=src.dtype, device=src.device, memory_format=fmt)
    total = out.numel()
    if total:
        kernel[(triton.cdiv(total, _BLOCK),)](
            src,
            actions.contiguous(),
            actions if index is None else index.contiguous(),
            out,
            total,
            shape[1],
            h,
            w,
            p,
            INDEXED=index is not None,
            CL=cl,
            BLOCK=_BLOCK,
        )
    return out


def crop_patches(
    images: torch.Tensor, actions: torch.Tensor, index: torch.Tensor | None, patch_size: int
) -> torch.Tensor:
    _, c, h, w = images.shape
    b = actions.shape[0]
    return _launch(_crop_kernel, images, actions, index, (b, c, patch_size, patch_size), h, w, patch_size)


def crop_patches_backward(grad: torch.Tensor, actions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, c, p, _ = grad.shape
    return _launch(_crop_backward_kernel, grad, actions, None, (b, c, height, width), height, width, p)
