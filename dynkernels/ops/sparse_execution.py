"""Spatially sparse execution (issue 14): mask compaction, pixel gather and
scatter, and DynConv's Gumbel gate and sparsity loss.

* ``mask_to_index(mask, *, halo=0, capacity=None, inverse=False)``: the
  active pixels of a (B, 1, H, W) bool mask (with ``halo``, of the mask
  dilated by a (2 halo + 1)^2 square, zero outside the image: the input a
  k x k conv with k = 2 halo + 1 needs on the mask) as flat indices
  ``b*H*W + y*W + x`` in increasing order, and their count as a 0-dim int64
  tensor. On CPU the index has exactly ``count`` entries unless ``capacity``
  is given (then ``capacity`` entries, -1 after the count; more active
  pixels than that raise). On CUDA it always has ``capacity`` entries
  (default B*H*W) and the count stays on the device: nothing syncs (an
  overflow there drops the excess entries; compare ``count`` with the
  capacity when it matters). ``inverse=True`` adds the inverse map
  (B, H, W) int64: each pixel's row in the index, or -1.
* ``gather_pixels(x, index) -> (P, C)``: x's channels at those pixels, a
  zero row where the index is -1 (a capacity buffer's padding). x
  channels-first or channels-last.
* ``scatter_pixels(rows, index, out, *, mode="set"|"add")``: a copy of out
  with the rows written or added at the pixels (-1 rows dropped); the
  result keeps out's layout. "set" refuses repeated indices on CPU; "add"
  sums repeats in row order (deterministic).
* Gradients: gather's is a scatter-add, scatter's is a gather (to rows) and
  the output gradient with the set pixels zeroed (to out).
* ``masked_depthwise_conv2d(rows, inverse_map, out_index, weight, bias=None,
  *, stride=1, padding=0, dilation=1) -> (P_out, C)``: a depthwise k x k
  convolution evaluated at the output pixels ``out_index`` only (flat
  ``b*Ho*Wo + y*Wo + x``; -1 gives a zero row), reading its input from
  ``rows`` (P_in, C) through ``inverse_map`` (B, H, W) (the input mask's
  rows, -1 outside it): a tap outside the image or the input mask reads
  zero. DynConv's ``masked_conv_dw``, which reads ``rows[-1]`` there (its
  dilated mask is meant to cover every tap). Gradients to rows, weight and
  bias.
* ``masked_conv2d(rows, inverse_map, out_index, weight, bias=None, *,
  stride=1, padding=0, dilation=1) -> (P_out, Cout)``: the same for a dense
  convolution (weight (Cout, Cin, kh, kw), groups 1): the sparse 3x3 convs of
  the ResNet blocks, computed by blocks of output rows as im2col on the
  active rows + GEMM (no dense image). Gradients to rows, weight and bias.
* ``reduce_mask(mask, block_size, block_stride, *, block_offset=(0, 0),
  block_count=None, threshold=0.0, mode="max"|"avg", capacity=None,
  empty_block=False) -> (indices (M, 3), count)``: SBNet's tiles. Block
  (by, bx) of sample n covers rows [oy + by*sy, +bh) and columns
  [ox + bx*sx, +bw), clipped to the image (a negative offset pads); "max":
  active if a value there exceeds the threshold, "avg": if their sum over
  the full block area bh*bw does. Indices (n, by, bx) int64 in that order;
  the block count defaults to the blocks whose first row and column lie in
  the image. Capacity and counts as ``mask_to_index``. SBNet returns one
  block (0, 0, 0) and a count of 1 for an empty mask: ``empty_block=True``
  keeps that; the default returns none.
* ``gather_tiles(x, tiles, block_size, block_stride, *, block_offset=(0, 0))
  -> (M, C, bh, bw)`` and ``scatter_tiles(blocks, tiles, out, block_stride, *,
  block_offset=(0, 0), mode="set"|"add")``: SBNet's sparse_gather /
  sparse_scatter on reduce_mask's tiles (zero outside the image; clipped
  writes; -1 tiles read zeros and write nothing; overlapping tiles in "set"
  mode: which one wins is undefined, as in SBNet). Gradients both ways.
* ``run_on_subset(fn, x, keep, *, capacity=None)``: ``fn`` run on the samples
  whose gate is on, the others passed through (layer skipping at batch > 1,
  no per-sample Python loop).
* ``gumbel_gate`` and ``sparsity_loss``: DynConv's mask unit gate and
  budget loss (see :mod:`dynkernels.reference.sparse_execution`), plain
  PyTorch compositions (no kernel of their own).

Backends: "cpp" (auto on CPU; csrc/sparse_execution/pixel_index_cpu.cpp),
"composite" (auto on CUDA: cumsum compaction and index_select / index_put
with no host sync) and "reference" (nonzero and indexing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ..reference import sparse_execution as ref
from ._registration import register_kernel_pairs
from ._validation import check_int, check_real, check_same_device, check_tensor

__all__ = [
    "gather_pixels",
    "gather_tiles",
    "gumbel_gate",
    "mask_to_index",
    "masked_conv2d",
    "masked_depthwise_conv2d",
    "reduce_mask",
    "run_on_subset",
    "scatter_pixels",
    "scatter_tiles",
    "sparsity_loss",
]

FAMILY = "sparse_execution"
_AUTO = {"cpu": ("cpp", "composite", "reference"), "cuda": ("triton", "composite", "reference")}
register_op(
    "mask_to_index", FAMILY, ("reference", "cpp", "triton", "composite"), reference=ref.mask_to_index, auto=_AUTO
)
for _name in ("gather_pixels", "scatter_pixels"):
    register_op(
        _name,
        FAMILY,
        ("reference", "cpp", "triton", "composite"),
        reference=getattr(ref, _name),
        differentiable=("reference", "cpp", "triton", "composite"),
        auto=_AUTO,
    )
for _name in ("masked_depthwise_conv2d", "masked_conv2d"):
    register_op(
        _name,
        FAMILY,
        ("reference", "cpp", "triton"),
        reference=getattr(ref, _name),
        differentiable=("reference", "cpp", "triton"),
    )
register_op("reduce_mask", FAMILY, ("reference", "composite"), reference=ref.reduce_mask)
for _name in ("gather_tiles", "scatter_tiles"):
    register_op(
        _name,
        FAMILY,
        ("reference", "composite"),
        reference=getattr(ref, _name),
        differentiable=("reference", "composite"),
    )
_MODES = {"set": 0, "add": 1}


def _check_mask(mask) -> torch.Tensor:
    mask = check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W), got {tuple(mask.shape)}")
    return mask


def mask_to_index(
    mask: torch.Tensor, *, halo: int = 0, capacity: int | None = None, inverse: bool = False, backend=None
):
    """See the module docstring. Returns (index, count) or (index, count, inverse)."""
    mask = _check_mask(mask)
    halo = check_int("halo", halo, 0)
    b, _, h, w = mask.shape
    if halo and (halo >= h or halo >= w):
        raise ValueError(f"halo={halo} is larger than the image ({h} x {w}): it must be < min(H, W)")
    if capacity is not None:
        capacity = check_int("capacity", capacity, 0)
    chosen = resolve("mask_to_index", mask.device, backend)
    if chosen == "cpp":
        index, count, table = torch.ops.dynkernels.mask_to_index(
            mask, halo, -1 if capacity is None else capacity, inverse
        )
    elif chosen == "triton":
        if capacity is None and mask.device.type != "cpu":
            capacity = b * h * w  # an upper bound: nothing syncs
        index, count, table = torch.ops.dynkernels.mask_to_index_triton(
            mask, halo, -1 if capacity is None else capacity, inverse
        )
    elif chosen == "composite":
        index, count, table = _mask_to_index_composite(mask, halo, capacity, inverse)
    else:
        out = ref.mask_to_index(mask, halo=halo, inverse=inverse)
        index, count, table = out if inverse else (*out, None)
        if capacity is not None:
            if index.numel() > capacity:
                raise ValueError(
                    f"capacity overflow: the mask has {index.numel()} active pixels, capacity is {capacity}"
                )
            index = torch.cat([index, index.new_full((capacity - index.numel(),), -1)])
    return (index, count, table) if inverse else (index, count)


def _mask_to_index_composite(mask, halo, capacity, inverse):
    """Device-side compaction: a running count of the active pixels places each
    one; inactive ones go to a spare slot past the end. No host sync on CUDA."""
    b, _, h, w = mask.shape
    active = ref.dilate_mask(mask, halo).reshape(-1)
    slots = torch.cumsum(active, 0) - 1
    count = active.sum()
    if mask.device.type == "cpu" and capacity is None:
        size = int(count)  # a CPU tensor: no device to sync with
    else:
        size = b * h * w if capacity is None else capacity
        if mask.device.type == "cpu" and int(count) > size:
            raise ValueError(f"capacity overflow: the mask has {int(count)} active pixels, capacity is {size}")
    where = torch.where(active & (slots < size), slots, size)
    index = torch.full((size + 1,), -1, dtype=torch.int64, device=mask.device)
    index.scatter_(0, where, torch.arange(active.numel(), device=mask.device))
    index = index[:size]
    table = torch.where(active, slots, -1).view(b, h, w) if inverse else None
    return index, count, table


def _check_index(index, n: int, backend: str | None = None) -> torch.Tensor:
    """The dtype and rank; the range too, on CPU, unless the C++ kernel (which checks it itself) runs."""
    index = check_tensor("index", index)
    if index.dtype != torch.int64 or index.dim() != 1:
        raise TypeError(f"index must be a 1-D int64 tensor, got {index.dtype} with shape {tuple(index.shape)}")
    skip = backend == "cpp" or torch.compiler.is_compiling()
    if not skip and index.device.type == "cpu" and index.numel():
        low, high = int(index.min()), int(index.max())
        if low < -1 or high >= n:
            raise IndexError(f"index must hold pixels in [-1, B*H*W = {n}), got values in [{low}, {high}]")
    return index


def _check_image(name: str, x) -> torch.Tensor:
    x = check_tensor(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got {tuple(x.shape)}")
    return x


def gather_pixels(x: torch.Tensor, index: torch.Tensor, *, backend=None) -> torch.Tensor:
    """x (B, C, H, W), index (P,) int64 in [-1, B*H*W) -> (P, C)."""
    x = _check_image("x", x)
    b, c, h, w = x.shape
    chosen = resolve("gather_pixels", x.device, backend)
    index = _check_index(index, b * h * w, chosen)
    check_same_device(x=x, index=index)
    if chosen == "cpp":
        return torch.ops.dynkernels.gather_pixels(x, index)
    if chosen == "triton":
        return torch.ops.dynkernels.gather_pixels_triton(x, index)
    if chosen == "composite":
        return _gather_composite(x, index)
    return ref.gather_pixels(x, index)


def _gather_composite(x, index):
    b, c, h, w = x.shape
    valid = (index >= 0).to(x.dtype)[:, None]
    safe = index.clamp(min=0)
    if x.is_contiguous(memory_format=torch.channels_last):  # (B*H*W, C) is a view
        return x.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, safe) * valid
    planes = x.reshape(b, c, h * w)
    return planes[safe // (h * w), :, safe % (h * w)] * valid


def scatter_pixels(
    rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor, *, mode: str = "set", backend=None
) -> torch.Tensor:
    """A copy of out (B, C, H, W) with rows (P, C) set or added at index (P,)."""
    out = _check_image("out", out)
    rows = check_tensor("rows", rows)
    if mode not in _MODES:
        raise ValueError(f"mode must be 'set' or 'add', got {mode!r}")
    b, c, h, w = out.shape
    chosen = resolve("scatter_pixels", out.device, backend)
    index = _check_index(index, b * h * w, chosen)
    if rows.dim() != 2 or rows.shape != (index.numel(), c):
        raise ValueError(f"rows must be (P, C) = ({index.numel()}, {c}), got {tuple(rows.shape)}")
    if rows.dtype != out.dtype:
        raise TypeError(f"rows and out must share a dtype, got {rows.dtype} and {out.dtype}")
    check_same_device(rows=rows, index=index, out=out)
    if chosen == "cpp":
        return torch.ops.dynkernels.scatter_pixels(rows, index, out, _MODES[mode])
    if chosen == "triton":
        return torch.ops.dynkernels.scatter_pixels_triton(rows, index, out, _MODES[mode])
    if chosen == "composite":
        return _scatter_composite(rows, index, out, mode)
    return ref.scatter_pixels(rows, index, out, mode=mode)


def _scatter_composite(rows, index, out, mode):
    """Each (row, channel) element's flat position in a copy of out, padding
    rows aimed at one spare element past the end (so they never touch a real
    pixel), then one index_put_."""
    b, c, h, w = out.shape
    total = out.numel()
    channels_last = _layout(out) == torch.channels_last
    storage = out.new_empty(total + 1)
    body = storage[:total]
    safe, keep = index.clamp(min=0), index >= 0
    channels = torch.arange(c, device=out.device)
    if channels_last:  # memory (B, H, W, C)
        body.view(b, h, w, c).copy_(out.permute(0, 2, 3, 1))
        result = body.view(b, h, w, c).permute(0, 3, 1, 2)
        positions = safe[:, None] * c + channels
    else:
        body.view(b, c, h, w).copy_(out)
        result = body.view(b, c, h, w)
        plane = h * w
        positions = ((safe // plane)[:, None] * c + channels) * plane + (safe % plane)[:, None]
    positions = torch.where(keep[:, None], positions, total)
    storage.index_put_((positions.reshape(-1),), rows.reshape(-1), accumulate=mode == "add")
    return result


# ---- gradients: gather and scatter are each other's backward -----------------


def _gather_setup(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.x_shape, ctx.x_layout = x.shape, _layout(x)


def _layout(t):
    return (
        torch.channels_last
        if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        else torch.contiguous_format
    )


def _gather_backward_with(scatter_op):
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        zeros = grad.new_zeros(ctx.x_shape).contiguous(memory_format=ctx.x_layout)
        return scatter_op(grad.contiguous(), index, zeros, 1), None

    return backward


def _scatter_setup(ctx, inputs, output):
    rows, index, out, mode = inputs
    ctx.save_for_backward(index)
    ctx.mode = mode


def _scatter_backward_with(gather_op, scatter_op):
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        g_rows = gather_op(grad, index)
        g_out = grad
        if ctx.mode == 0:  # the set pixels' old values were overwritten
            g_out = scatter_op(grad.new_zeros(g_rows.shape), index, grad, 0)
        return g_rows, None, g_out, None

    return backward


def _fake_mask_to_index(mask, halo, capacity, with_inverse):
    b, _, h, w = mask.shape
    size = torch.library.get_ctx().new_dynamic_size() if capacity < 0 else capacity
    index = mask.new_empty((size,), dtype=torch.int64)
    table = mask.new_empty((b if with_inverse else 0, h, w), dtype=torch.int64)
    return index, mask.new_empty((), dtype=torch.int64), table


def _fake_gather(x, index):
    return x.new_empty((index.shape[0], x.shape[1]))


def _fake_scatter(rows, index, out, mode):
    return torch.empty(out.shape, dtype=out.dtype, device=out.device, memory_format=_layout(out))


# Opaque custom ops rather than torch.library.triton_op: see ops/pointops.py.
@torch.library.custom_op("dynkernels::mask_to_index_triton", mutates_args=())
def _mask_to_index_triton(
    mask: torch.Tensor, halo: int, capacity: int, with_inverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return family_kernels(FAMILY).mask_to_index(mask, halo, capacity, with_inverse)


@torch.library.custom_op("dynkernels::gather_pixels_triton", mutates_args=())
def _gather_triton(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return family_kernels(FAMILY).gather(x, index)


@torch.library.custom_op("dynkernels::scatter_pixels_triton", mutates_args=())
def _scatter_triton(rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor, mode: int) -> torch.Tensor:
    return family_kernels(FAMILY).scatter(rows, index, out, mode)


_PIXEL_OPS = [("_triton", torch.ops.dynkernels.gather_pixels_triton, torch.ops.dynkernels.scatter_pixels_triton)]
if has_extension():
    _PIXEL_OPS.append(("", torch.ops.dynkernels.gather_pixels, torch.ops.dynkernels.scatter_pixels))
for _suffix, _gather_op, _scatter_op in _PIXEL_OPS:
    torch.library.register_fake(f"dynkernels::mask_to_index{_suffix}")(_fake_mask_to_index)
    torch.library.register_fake(f"dynkernels::gather_pixels{_suffix}")(_fake_gather)
    torch.library.register_fake(f"dynkernels::scatter_pixels{_suffix}")(_fake_scatter)
    torch.library.register_autograd(
        f"dynkernels::gather_pixels{_suffix}", _gather_backward_with(_scatter_op), setup_context=_gather_setup
    )
    torch.library.register_autograd(
        f"dynkernels::scatter_pixels{_suffix}",
        _scatter_backward_with(_gather_op, _scatter_op),
        setup_context=_scatter_setup,
    )


def _pair_of(name: str, value, low: int | None) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return check_int(name, value[0], low), check_int(name, value[1], low)
    v = check_int(name, value, low)
    return v, v


def masked_depthwise_conv2d(
    rows: torch.Tensor,
    inverse_map: torch.Tensor,
    out_index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    backend=None,
) -> torch.Tensor:
    """See the module docstring. weight (C, 1, kh, kw)."""
    return _masked_conv(
        "masked_depthwise_conv2d", rows, inverse_map, out_index, weight, bias, stride, padding, dilation, backend
    )


def masked_conv2d(
    rows: torch.Tensor,
    inverse_map: torch.Tensor,
    out_index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    backend=None,
) -> torch.Tensor:
    """See the module docstring. weight (Cout, Cin, kh, kw), groups 1 -> (P_out, Cout)."""
    return _masked_conv("masked_conv2d", rows, inverse_map, out_index, weight, bias, stride, padding, dilation, backend)


def _masked_conv(name, rows, inverse_map, out_index, weight, bias, stride, padding, dilation, backend):
    depthwise = name == "masked_depthwise_conv2d"
    rows, inverse_map, weight = (
        check_tensor(n, t) for n, t in (("rows", rows), ("inverse_map", inverse_map), ("weight", weight))
    )
    stride, padding = _pair_of("stride", stride, 1), _pair_of("padding", padding, 0)
    dilation = _pair_of("dilation", dilation, 1)
    if rows.dim() != 2:
        raise ValueError(f"rows must be (P, C), got {tuple(rows.shape)}")
    c = rows.shape[1]
    if inverse_map.dim() != 3 or inverse_map.dtype != torch.int64:
        raise ValueError(
            f"inverse_map must be a (B, H, W) int64 tensor, got {inverse_map.dtype} {tuple(inverse_map.shape)}"
        )
    if depthwise and (weight.dim() != 4 or weight.shape[:2] != (c, 1)):
        raise ValueError(f"weight must be (C, 1, kh, kw) = ({c}, 1, kh, kw), got {tuple(weight.shape)}")
    if not depthwise and (weight.dim() != 4 or weight.shape[1] != c):
        raise ValueError(f"weight must be (Cout, Cin, kh, kw) with Cin = {c}, got {tuple(weight.shape)}")
    cout = weight.shape[0]
    if bias is not None and (check_tensor("bias", bias).shape != (cout,)):
        raise ValueError(f"bias must be (Cout,) = ({cout},), got {tuple(bias.shape)}")
    dtypes = {t.dtype for t in (rows, weight, *(() if bias is None else (bias,)))}
    if len(dtypes) > 1 or not rows.is_floating_point():
        raise TypeError(f"rows, weight and bias must share a floating dtype, got {sorted(map(str, dtypes))}")
    b, h, w = inverse_map.shape
    ho = (h + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"the kernel does not fit the padded {h} x {w} input")
    chosen = resolve(name, rows.device, backend)
    out_index = _check_index(out_index, b * ho * wo, chosen)
    check_same_device(rows=rows, inverse_map=inverse_map, out_index=out_index, weight=weight)
    if chosen == "cpp":
        return getattr(torch.ops.dynkernels, name)(
            rows, inverse_map, out_index, weight, bias, stride, padding, dilation
        )
    if chosen == "triton":
        if rows.device.type == "cpu" and not torch.compiler.is_compiling() and inverse_map.numel():
            low, high = int(inverse_map.min()), int(inverse_map.max())  # (the C++ kernel checks its own)
            if low < -1 or high >= rows.shape[0]:
                raise IndexError(f"inverse_map must hold rows in [-1, P_in = {rows.shape[0]}), got [{low}, {high}]")
        return getattr(torch.ops.dynkernels, name + "_triton")(
            rows, inverse_map, out_index, weight, bias, stride, padding, dilation
        )
    return getattr(ref, name)(
        rows, inverse_map, out_index, weight, bias, stride=stride, padding=padding, dilation=dilation
    )


def _masked_setup(ctx, inputs, output):
    rows, inverse, out_index, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(rows, inverse, out_index, weight)
    ctx.with_bias, ctx.geometry = bias is not None, (stride, padding, dilation)


def _masked_backward(ctx, backward_op, grad):
    rows, inverse, out_index, weight = ctx.saved_tensors
    g_rows, g_weight, g_bias = backward_op(grad, rows, inverse, out_index, weight, ctx.with_bias, *ctx.geometry)
    return g_rows, None, None, g_weight, (g_bias if ctx.with_bias else None), None, None, None


def _fake_masked(rows, inverse, out_index, weight, bias, stride, padding, dilation):
    return rows.new_empty((out_index.shape[0], weight.shape[0]))


def _fake_masked_backward(grad, rows, inverse, out_index, weight, with_bias, stride, padding, dilation):
    g_bias = rows.new_empty((weight.shape[0],) if with_bias else (0,))
    return rows.new_empty(rows.shape), weight.new_empty(weight.shape), g_bias


# ---- the Triton masked convolutions: tap tables built on the device, no sync ---


def _output_size(inverse, kh, kw, stride, padding, dilation):
    _, h, w = inverse.shape
    return (
        (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1,
        (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1,
    )


def _tap_table(inverse, out_index, kh, kw, stride, padding, dilation):
    """(P_out, kh*kw): the input row each tap of each output row reads, -1 for none."""
    b, h, w = inverse.shape
    ho, wo = _output_size(inverse, kh, kw, stride, padding, dilation)
    pos = out_index.clamp(min=0)
    n, oy, ox = pos // (ho * wo), pos // wo % ho, pos % wo
    taps_y = torch.arange(kh, device=pos.device) * dilation[0]
    taps_x = torch.arange(kw, device=pos.device) * dilation[1]
    iy = oy[:, None] * stride[0] - padding[0] + taps_y  # (P, kh)
    ix = ox[:, None] * stride[1] - padding[1] + taps_x  # (P, kw)
    ok = ((iy >= 0) & (iy < h))[:, :, None] & ((ix >= 0) & (ix < w))[:, None, :] & (out_index >= 0)[:, None, None]
    flat = (n[:, None, None] * h + iy.clamp(0, h - 1)[:, :, None]) * w + ix.clamp(0, w - 1)[:, None, :]
    return torch.where(ok, inverse.reshape(-1)[flat], -1).reshape(out_index.shape[0], kh * kw)


def _inverse_of(index, size):
    """(size,) int64: each slot's position in index (the entries that are >= 0), -1 for none."""
    table = torch.full((size + 1,), -1, dtype=torch.int64, device=index.device)
    table.scatter_(0, torch.where(index >= 0, index, size), torch.arange(index.numel(), device=index.device))
    return table[:size]


def _reader_table(inverse, out_index, rows_in, kh, kw, stride, padding, dilation):
    """(P_in, kh*kw): the output row whose tap t reads each input row, -1 for none."""
    b, h, w = inverse.shape
    ho, wo = _output_size(inverse, kh, kw, stride, padding, dilation)
    pix = _inverse_of(inverse.reshape(-1), rows_in)  # each input row's pixel
    out_row = _inverse_of(out_index, b * ho * wo)  # each output pixel's row
    p = pix.clamp(min=0)
    n, iy, ix = p // (h * w), p // w % h, p % w
    ty = iy[:, None] + padding[0] - torch.arange(kh, device=p.device) * dilation[0]  # (P, kh): oy * stride
    tx = ix[:, None] + padding[1] - torch.arange(kw, device=p.device) * dilation[1]
    oy, ox = ty.div(stride[0], rounding_mode="floor"), tx.div(stride[1], rounding_mode="floor")
    ok_y = (ty >= 0) & (ty % stride[0] == 0) & (oy < ho)
    ok_x = (tx >= 0) & (tx % stride[1] == 0) & (ox < wo)
    ok = ok_y[:, :, None] & ok_x[:, None, :] & (pix >= 0)[:, None, None]
    flat = (n[:, None, None] * ho + oy.clamp(0, ho - 1)[:, :, None]) * wo + ox.clamp(0, wo - 1)[:, None, :]
    return torch.where(ok, out_row[flat], -1).reshape(rows_in, kh * kw)


@torch.library.custom_op("dynkernels::masked_depthwise_conv2d_triton", mutates_args=())
def _masked_depthwise_triton(
    rows: torch.Tensor,
    inverse: torch.Tensor,
    out_index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    kh, kw = weight.shape[2:]
    table = _tap_table(inverse, out_index, kh, kw, stride, padding, dilation)
    taps_by_channel = weight.reshape(weight.shape[0], kh * kw).t()
    return family_kernels(FAMILY).tap_depthwise(rows, table, taps_by_channel, bias, out_index)


@torch.library.custom_op("dynkernels::masked_depthwise_conv2d_backward_triton", mutates_args=())
def _masked_depthwise_backward_triton(
    grad: torch.Tensor,
    rows: torch.Tensor,
    inverse: torch.Tensor,
    out_index: torch.Tensor,
    weight: torch.Tensor,
    with_bias: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernels = family_kernels(FAMILY)
    c, _, kh, kw = weight.shape
    taps_by_channel = weight.reshape(c, kh * kw).t()
    readers = _reader_table(inverse, out_index, rows.shape[0], kh, kw, stride, padding, dilation)
    g_rows = kernels.tap_depthwise(grad, readers, taps_by_channel)
    table = _tap_table(inverse, out_index, kh, kw, stride, padding, dilation)
    g_weight = kernels.tap_depthwise_wgrad(rows, table, grad).t().reshape(c, 1, kh, kw).contiguous()
    return g_rows, g_weight, _bias_grad(grad, out_index, with_bias)


def _bias_grad(grad, out_index, with_bias):
    if not with_bias:
        return grad.new_empty((0,))
    return (grad * (out_index >= 0).to(grad.dtype)[:, None]).sum(0)


@torch.library.custom_op("dynkernels::masked_conv2d_triton", mutates_args=())
def _masked_conv_triton(
    rows: torch.Tensor,
    inverse: torch.Tensor,
    out_index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    cout, cin, kh, kw = weight.shape
    table = _tap_table(inverse, out_index, kh, kw, stride, padding, dilation)
    weight_kn = weight.permute(2, 3, 1, 0).reshape(kh * kw * cin, cout)
    return family_kernels(FAMILY).tap_gemm(rows, table, weight_kn, bias, out_index)


@torch.library.custom_op("dynkernels::masked_conv2d_backward_triton", mutates_args=())
def _masked_conv_backward_triton(
    grad: torch.Tensor,
    rows: torch.Tensor,
    inverse: torch.Tensor,
    out_index: torch.Tensor,
    weight: torch.Tensor,
    with_bias: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernels = family_kernels(FAMILY)
    cout, cin, kh, kw = weight.shape
    readers = _reader_table(inverse, out_index, rows.shape[0], kh, kw, stride, padding, dilation)
    g_rows = kernels.tap_gemm(grad, readers, weight.permute(2, 3, 0, 1).reshape(kh * kw * cout, cin))
    table = _tap_table(inverse, out_index, kh, kw, stride, padding, dilation)
    g_weight = kernels.tap_gemm_wgrad(rows, table, grad).view(kh, kw, cin, cout).permute(3, 2, 0, 1).contiguous()
    return g_rows, g_weight, _bias_grad(grad, out_index, with_bias)


_MASKED_PAIRS = [
    ("dynkernels::masked_depthwise_conv2d_triton", "dynkernels::masked_depthwise_conv2d_backward_triton"),
    ("dynkernels::masked_conv2d_triton", "dynkernels::masked_conv2d_backward_triton"),
]
if has_extension():
    _MASKED_PAIRS += [
        ("dynkernels::masked_depthwise_conv2d", "dynkernels::masked_depthwise_conv2d_backward"),
        ("dynkernels::masked_conv2d", "dynkernels::masked_conv2d_backward"),
    ]
# one registration for the C++ and the Triton pairs (they share signatures)
register_kernel_pairs(
    _MASKED_PAIRS,
    fake=_fake_masked,
    fake_backward=_fake_masked_backward,
    setup_context=_masked_setup,
    backward=_masked_backward,
)


# ---- DynConv's gate and budget loss (compositions) ---------------------------


def gumbel_gate(
    logits: torch.Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    training: bool = True,
    noise: bool = True,
    generator: torch.Generator | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """DynConv's Gumbel gate (maskunit.Gumbel): in training, sigmoid((logits +
    g1 - g2) / tau) with Gumbel noise g = -log(-log(U + eps) + eps) (``noise=
    False``: none), made hard by a straight-through step at 1/2 (``hard=False``:
    the soft gate); at inference (``training=False``) logits >= 0."""
    logits = check_tensor("logits", logits)
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    tau = check_real("tau", tau)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return ref.gumbel_gate(logits, tau=tau, hard=hard, training=training, noise=noise, generator=generator, eps=eps)


def sparsity_loss(masks, dilated, flops, *, target: float, epoch: float, num_epochs: int) -> torch.Tensor:
    """DynConv's SparsityCriterion (see :func:`dynkernels.reference.sparse_execution.sparsity_loss`)."""
    if not masks or not (len(masks) == len(dilated) == len(flops)):
        raise ValueError("masks, dilated and flops must be non-empty lists of the same length")
    target = check_real("target", target)
    if not 0 <= target <= 1:
        raise ValueError(f"target must be in [0, 1], got {target}")
    num_epochs = check_int("num_epochs", num_epochs, 1)
    return ref.sparsity_loss(masks, dilated, flops, target=target, epoch=epoch, num_epochs=num_epochs)


def run_on_subset(fn, x: torch.Tensor, keep: torch.Tensor, *, capacity: int | None = None) -> torch.Tensor:
    """Layer skipping: ``fn`` on the samples of x (B, ...) whose ``keep`` (B,)
    bool is set, compacted into one batch; the others pass through unchanged
    (a skipped block's identity). fn must map (n, ...) to (n, ...) of x's
    per-sample shape. Returns a new tensor; gradients flow to x and fn.

    Without ``capacity`` the subset is exactly the kept samples (``nonzero``:
    a host sync on GPUs, to size fn's batch). With ``capacity`` fn always runs
    on ``capacity`` samples -- the kept ones first (in order), then copies of
    sample 0 as padding whose results are dropped -- so nothing syncs; kept
    samples past the capacity are passed through (compare keep.sum() with it
    where that matters)."""
    x = check_tensor("x", x)
    keep = check_tensor("keep", keep)
    if keep.dtype != torch.bool or keep.shape != x.shape[:1]:
        raise ValueError(f"keep must be a (B,) bool tensor with B = {x.shape[0]}, got {keep.dtype} {tuple(keep.shape)}")
    check_same_device(x=x, keep=keep)
    batch = x.shape[0]
    if capacity is None:
        index = torch.nonzero(keep).reshape(-1)
        if index.numel() == 0:
            return x.clone()
        return x.index_copy(0, index, _check_subset(fn(x.index_select(0, index)), x, index.numel()))
    capacity = check_int("capacity", capacity, 1)
    slots = torch.cumsum(keep, 0) - 1
    where = torch.where(keep & (slots < capacity), slots, capacity)
    index = torch.zeros(capacity + 1, dtype=torch.int64, device=x.device)
    index.scatter_(0, where, torch.arange(batch, device=x.device))
    index = index[:capacity]  # the kept samples in order, then sample 0 as padding
    used = torch.arange(capacity, device=x.device) < keep.sum().clamp(max=capacity)
    y = _check_subset(fn(x.index_select(0, index)), x, capacity)
    target = torch.where(used, index, batch)  # padding results go to a spare row, dropped
    spare = torch.cat([x, x[:1]])
    return spare.index_copy(0, target, y)[:batch]


def _check_subset(y, x, n):
    if not isinstance(y, torch.Tensor) or y.shape != (n, *x.shape[1:]):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"fn must map ({n}, ...) samples to ({n}, {', '.join(map(str, x.shape[1:]))}), got {got}")
    return y.to(x.dtype)


def reduce_mask(
    mask: torch.Tensor,
    block_size,
    block_stride,
    *,
    block_offset=(0, 0),
    block_count=None,
    threshold: float = 0.0,
    mode: str = "max",
    capacity: int | None = None,
    empty_block: bool = False,
    backend=None,
):
    """SBNet's reduce_mask (see the module docstring) -> (indices (M, 3) int64, count)."""
    mask = check_tensor("mask", mask)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W), got {tuple(mask.shape)}")
    if mode not in ("max", "avg"):
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    size, stride = _pair_of("block_size", block_size, 1), _pair_of("block_stride", block_stride, 1)
    offset = _pair_of("block_offset", block_offset, None)
    if any(o <= -s for o, s in zip(offset, size, strict=True)):
        raise ValueError(f"block_offset {offset} leaves the first block outside the image (block_size {size})")
    h, w = mask.shape[2:]
    count = (
        ref.default_block_count((h, w), stride, offset)
        if block_count is None
        else _pair_of("block_count", block_count, 1)
    )
    threshold = check_real("threshold", threshold)
    chosen = resolve("reduce_mask", mask.device, backend)
    if chosen == "reference":
        indices, total = ref.reduce_mask(
            mask, size, stride, offset, count, threshold=threshold, mode=mode, empty_block=empty_block
        )
        if capacity is not None:
            if indices.shape[0] > capacity:
                raise ValueError(f"capacity overflow: {indices.shape[0]} active blocks, capacity is {capacity}")
            indices = torch.cat([indices, indices.new_full((capacity - indices.shape[0], 3), -1)])
        return indices, total
    values = mask.to(torch.float32 if not mask.is_floating_point() else mask.dtype)
    if mode == "max":  # the values that count, so that the padding never does whatever the threshold
        values = (values > threshold).to(values.dtype)
    (bh, bw), (sy, sx), (oy, ox), (ch, cw) = size, stride, offset, count
    top, left = max(0, -oy), max(0, -ox)
    bottom = max(0, oy + (ch - 1) * sy + bh - h)
    right = max(0, ox + (cw - 1) * sx + bw - w)
    padded = F.pad(values, (left, right, top, bottom))[:, :, oy + top :, ox + left :]
    pooled = F.max_pool2d(padded, (bh, bw), (sy, sx)) if mode == "max" else F.avg_pool2d(padded, (bh, bw), (sy, sx))
    pooled = pooled[:, :, :ch, :cw]
    active = pooled > (0.5 if mode == "max" else threshold)
    flat, total = mask_to_index(active, capacity=capacity, backend=None)
    blocks = ch * cw
    indices = torch.stack([flat // blocks, flat // cw % ch, flat % cw], 1)
    indices = torch.where(flat[:, None] >= 0, indices, -1)
    if empty_block:
        if indices.shape[0] == 0:  # exact (CPU) sizes: nothing active
            indices, total = indices.new_zeros((1, 3)), total + 1
        else:
            none = total == 0
            indices = torch.cat([torch.where(none, 0, indices[:1]), indices[1:]])
            total = torch.where(none, 1, total)
    return indices, total


def _check_tiles(tiles) -> torch.Tensor:
    tiles = check_tensor("tiles", tiles)
    if tiles.dtype != torch.int64 or tiles.dim() != 2 or tiles.shape[1] != 3:
        raise ValueError(f"tiles must be an (M, 3) int64 tensor of (n, by, bx), got {tiles.dtype} {tuple(tiles.shape)}")
    return tiles


def _tile_grid(tiles, size, stride, offset, height, width):
    """Each tile's rows (M, th) and columns (M, tw), and which of them fall in the image and a valid tile."""
    (th, tw), (sy, sx), (oy, ox) = size, stride, offset
    on = tiles[:, 0] >= 0
    rows = oy + tiles[:, 1:2] * sy + torch.arange(th, device=tiles.device)
    cols = ox + tiles[:, 2:3] * sx + torch.arange(tw, device=tiles.device)
    valid = (on[:, None, None] & ((rows >= 0) & (rows < height))[:, :, None]) & ((cols >= 0) & (cols < width))[
        :, None, :
    ]
    return tiles[:, 0].clamp(min=0), rows.clamp(0, height - 1), cols.clamp(0, width - 1), valid


def gather_tiles(x, tiles, block_size, block_stride, *, block_offset=(0, 0), backend=None) -> torch.Tensor:
    """SBNet's sparse_gather (see the module docstring) -> (M, C, bh, bw)."""
    x = _check_image("x", x)
    tiles = _check_tiles(tiles)
    size, stride = _pair_of("block_size", block_size, 1), _pair_of("block_stride", block_stride, 1)
    offset = _pair_of("block_offset", block_offset, None)
    check_same_device(x=x, tiles=tiles)
    if resolve("gather_tiles", x.device, backend) == "reference":
        return ref.gather_tiles(x, tiles, size, stride, offset)
    n, rows, cols, valid = _tile_grid(tiles, size, stride, offset, x.shape[2], x.shape[3])
    picked = x.permute(0, 2, 3, 1)[n[:, None, None], rows[:, :, None], cols[:, None, :]]  # (M, bh, bw, C)
    return (picked * valid[..., None].to(x.dtype)).permute(0, 3, 1, 2).contiguous()


def scatter_tiles(
    blocks, tiles, out, block_stride, *, block_offset=(0, 0), mode: str = "set", backend=None
) -> torch.Tensor:
    """SBNet's sparse_scatter (see the module docstring): a copy of out."""
    out = _check_image("out", out)
    blocks = _check_image("blocks", blocks)
    tiles = _check_tiles(tiles)
    if mode not in _MODES:
        raise ValueError(f"mode must be 'set' or 'add', got {mode!r}")
    if blocks.shape[:2] != (tiles.shape[0], out.shape[1]) or blocks.dtype != out.dtype:
        raise ValueError(
            f"blocks must be (M, C, th, tw) = ({tiles.shape[0]}, {out.shape[1]}, ...) of out's dtype, "
            f"got {tuple(blocks.shape)} {blocks.dtype}"
        )
    stride, offset = _pair_of("block_stride", block_stride, 1), _pair_of("block_offset", block_offset, None)
    check_same_device(blocks=blocks, tiles=tiles, out=out)
    if resolve("scatter_tiles", out.device, backend) == "reference":
        return ref.scatter_tiles(blocks, tiles, out, stride, offset, mode=mode)
    b, c, h, w = out.shape
    n, rows, cols, valid = _tile_grid(tiles, blocks.shape[2:], stride, offset, h, w)
    total = out.numel()
    storage = out.new_empty(total + 1)
    channels = torch.arange(c, device=out.device)[None, :, None, None]
    r, q, nn_ = rows[:, None, :, None], cols[:, None, None, :], n[:, None, None, None]
    if _layout(out) == torch.channels_last:
        storage[:total].view(b, h, w, c).copy_(out.permute(0, 2, 3, 1))
        result = storage[:total].view(b, h, w, c).permute(0, 3, 1, 2)
        positions = ((nn_ * h + r) * w + q) * c + channels
    else:
        storage[:total].view(b, c, h, w).copy_(out)
        result = storage[:total].view(b, c, h, w)
        positions = ((nn_ * c + channels) * h + r) * w + q
    positions = torch.where(valid[:, None], positions, total)  # outside the image or a -1 tile: the spare
    storage.index_put_((positions.reshape(-1),), blocks.reshape(-1), accumulate=mode == "add")
    return result
