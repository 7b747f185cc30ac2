"""Dynamic convolution (CondConv, DY-CNN, ODConv) as one op (issue 13).

``dynamic_conv2d`` computes, for x (B, Cin, H, W), experts W (K, Cout,
Cin/g, kh, kw), routing pi (B, K), expert biases (K, Cout) and ODConv's
optional attentions (in_scale (B, Cin), out_scale (B, Cout), kernel_scale
(B, kh, kw)):

    y_b = out_scale_b ⊙ conv(in_scale_b ⊙ x_b, kernel_scale_b ⊙ Σ_k pi_bk W_k) + Σ_k pi_bk bias_k

Every backend but the reference first folds all three attentions into the
per-sample kernels -- conv is linear in x and in the kernel, so in_scale
scales the kernels' input channels, out_scale their output filters,
kernel_scale their taps. It never builds the (B, K, Cout, Cin/g, kh, kw)
product that ODConv's code sums over K, nor scaled copies of x and y: the
aggregated kernels (B, Cout, Cin/g, kh, kw) are the largest tensor it holds.
Then, by layer:

* 1x1 without padding (any stride, any groups): one batched GEMM,
  ``bmm(kernels_b, x_b)`` over the B * groups blocks (both "cpp" and
  "composite").
* depthwise (groups == Cin == Cout): "cpp" runs
  ``per_sample_depthwise_conv2d`` (csrc/dynamic_conv/depthwise_cpu.cpp), a
  direct convolution with one kernel per (sample, channel) plane, forward
  and backward, deterministic; "composite" the grouped conv below.
* any other kxk: backend="cpp" runs ``per_sample_conv2d``
  (csrc/dynamic_conv/per_sample_conv_cpu.cpp), a blocked im2col + GEMM per
  (sample, group) -- output-row blocks sized to stay in L2, one BLAS GEMM
  each, channels-first or channels-last --, forward and backward,
  deterministic, 0.4-0.7x the peak memory of the grouped conv; auto on CPU
  and "composite" run one grouped convolution with groups = B * groups (the
  public code's trick, on the folded kernels), because oneDNN's direct
  convolution measured 1.05-1.5x faster than single-threaded BLAS GEMMs on
  im2col blocks at these layers (docs/dynamic_conv.md).
* "triton" (auto on CUDA) instead mixes the experts inside an implicit-GEMM
  kernel (triton_kernels/dynamic_conv.py): no folded kernels in memory.

Backends: "cpp" (auto on CPU; float32/float64 -- the C++ kernels above),
"composite" (PyTorch ops; any dtype and device) and "reference" (the
per-sample formula, :func:`dynkernels.reference.dynamic_conv2d`). Autograd
gives every gradient (x, weight, routing, bias and each scale); the ones
that reduce over the batch (weight, bias) are GEMMs through the routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ._registration import register_kernel_pairs
from ._validation import check_floating, check_int, check_same_device, check_tensor

__all__ = ["dynamic_conv2d"]

FAMILY = "dynamic_conv"
_BACKENDS = ("reference", "cpp", "triton", "composite")
register_op("dynamic_conv2d", FAMILY, _BACKENDS, reference=reference.dynamic_conv2d, differentiable=_BACKENDS)
_CPP_DTYPES = (torch.float32, torch.float64)


def _pair(name: str, value, low: int) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return check_int(name, value[0], low), check_int(name, value[1], low)
    v = check_int(name, value, low)
    return v, v


def _check(x, weight, routing, bias, groups, in_scale, out_scale, kernel_scale) -> None:
    named = dict(x=x, weight=weight, routing=routing)
    named.update({k: v for k, v in (("bias", bias), ("in_scale", in_scale), ("out_scale", out_scale)) if v is not None})
    if kernel_scale is not None:
        named["kernel_scale"] = kernel_scale
    for name, t in named.items():
        check_tensor(name, t)
        check_floating(name, t)
    check_same_device(**named)
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"all tensors must share a dtype, got {dtypes}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, Cin, H, W), got {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"weight must be (K, Cout, Cin / groups, kh, kw), got {tuple(weight.shape)}")
    batch, cin = x.shape[:2]
    experts, cout, per_group = weight.shape[:3]
    if cin % groups or cout % groups:
        raise ValueError(f"groups={groups} must divide Cin={cin} and Cout={cout}")
    if per_group * groups != cin:
        raise ValueError(
            f"weight has Cin / groups = {per_group} input channels, x has Cin = {cin} with groups={groups}"
        )
    if routing.shape != (batch, experts):
        raise ValueError(f"routing must be (B, K) = ({batch}, {experts}), got {tuple(routing.shape)}")
    expected = dict(bias=(experts, cout), in_scale=(batch, cin), out_scale=(batch, cout))
    expected["kernel_scale"] = (batch, *weight.shape[3:])
    for name, shape in expected.items():
        if name in named and named[name].shape != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(named[name].shape)}")


def dynamic_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    routing: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    in_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    kernel_scale: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """A per-sample mixture of K expert convolutions (see the module
    docstring). stride, padding, dilation: ints or pairs, as F.conv2d;
    groups divides Cin and Cout. Returns (B, Cout, Ho, Wo).
    backend: None (auto: "triton" on CUDA, "cpp" on CPU), "cpp", "triton",
    "composite" or "reference"."""
    groups = check_int("groups", groups, 1)
    stride, padding, dilation = _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    _check(x, weight, routing, bias, groups, in_scale, out_scale, kernel_scale)
    chosen = resolve("dynamic_conv2d", x.device, backend)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if chosen == "reference" or x.shape[0] == 0:
        return reference.dynamic_conv2d(
            x, weight, routing, bias, in_scale=in_scale, out_scale=out_scale, kernel_scale=kernel_scale, **geometry
        )
    if chosen == "triton":  # mixes the experts inside the kernel: no folded kernels in memory
        return torch.ops.dynkernels.dynamic_conv2d_triton(
            x, weight, routing, bias, in_scale, out_scale, kernel_scale, stride, padding, dilation, groups
        )
    if chosen == "cpp" and x.dtype not in _CPP_DTYPES:
        if backend is not None:
            raise ValueError(f"dynamic_conv2d(backend='cpp') takes float32 or float64, got {x.dtype}")
        chosen = "composite"
    kernels, biases = _fold(weight, routing, bias, in_scale, out_scale, kernel_scale, groups)
    # general kxk layers: the C++ im2col kernel when "cpp" is asked for by name; auto takes
    # oneDNN's grouped conv on the folded kernels, measured faster on CPU (docs/dynamic_conv.md)
    return _convolve(chosen, x, kernels, biases, im2col=backend == "cpp", **geometry)


def _scales(in_scale, out_scale, kernel_scale, groups, cout, per_group):
    """The attentions as factors broadcast against (B, Cout, Cin/g, kh, kw)."""
    factors = {}
    if out_scale is not None:
        factors["out_scale"] = out_scale[:, :, None, None, None]
    if in_scale is not None:
        # filter o of group o // (Cout/g) reads input channels (o // (Cout/g)) * Cin/g + j
        batch = in_scale.shape[0]
        channels = in_scale.view(batch, groups, 1, per_group).expand(batch, groups, cout // groups, per_group)
        factors["in_scale"] = channels.reshape(batch, cout, per_group, 1, 1)
    if kernel_scale is not None:
        factors["kernel_scale"] = kernel_scale[:, None, None]
    return factors


def _product(factors):
    out = None
    for f in factors:
        out = f if out is None else out * f
    return out


def _fold(weight, routing, bias, in_scale, out_scale, kernel_scale, groups):
    """The per-sample kernels (B, Cout, Cin/g, kh, kw) with the attentions
    folded in, and the per-sample biases (B, Cout) or None."""
    batch = routing.shape[0]
    experts, cout, per_group, kh, kw = weight.shape
    kernels = (routing @ weight.reshape(experts, -1)).view(batch, cout, per_group, kh, kw)
    scale = _product(_scales(in_scale, out_scale, kernel_scale, groups, cout, per_group).values())
    if scale is not None:
        kernels = kernels * scale
    return kernels, (routing @ bias if bias is not None else None)


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _convolve(chosen, x, kernels, biases, *, im2col, stride, padding, dilation, groups):
    batch, cin, h, w = x.shape
    _, cout, per_group, kh, kw = kernels.shape
    if kh == kw == 1 and padding == (0, 0):  # 1x1: a batched GEMM over the B * groups blocks
        xs = x[:, :, :: stride[0], :: stride[1]]
        ho, wo = xs.shape[-2:]
        if groups == 1 and _channels_last(x):  # (B, HW, Cin) @ (B, Cin, Cout): y channels-last, no copy of x
            rows = xs.permute(0, 2, 3, 1).reshape(batch, ho * wo, cin)
            y = torch.bmm(rows, kernels.view(batch, cout, cin).transpose(1, 2))
            if biases is not None:
                y = y + biases[:, None, :]
            return y.view(batch, ho, wo, cout).permute(0, 3, 1, 2)
        cols = xs.reshape(batch * groups, per_group, ho * wo)
        y = torch.bmm(kernels.reshape(batch * groups, cout // groups, per_group), cols).view(batch, cout, ho, wo)
        return y if biases is None else y + biases[:, :, None, None]
    if chosen == "cpp" and groups == cin == cout:
        return torch.ops.dynkernels.per_sample_depthwise_conv2d(
            x, kernels.view(batch, cout, kh, kw), biases, stride, padding, dilation
        )
    if chosen == "cpp" and im2col:
        return torch.ops.dynkernels.per_sample_conv2d(x, kernels, biases, stride, padding, dilation, groups)
    y = F.conv2d(
        x.reshape(1, batch * cin, h, w),
        kernels.reshape(batch * cout, per_group, kh, kw),
        biases.reshape(-1) if biases is not None else None,
        stride,
        padding,
        dilation,
        groups * batch,
    )
    return y.view(batch, cout, y.shape[-2], y.shape[-1])


# ---- torch.library registrations: fake kernels and autograd ----------------


def _per_sample_setup(ctx, inputs, output):
    x, kernels, bias, *geometry = inputs  # stride, padding, dilation (and groups for the general op)
    ctx.save_for_backward(x, kernels)
    ctx.with_bias, ctx.geometry = bias is not None, geometry


def _per_sample_backward(ctx, backward_op, grad):
    x, kernels = ctx.saved_tensors
    gx, gk, gb = backward_op(grad, x, kernels, ctx.with_bias, *ctx.geometry)  # the kernels take either layout
    return gx, gk, (gb if ctx.with_bias else None), *(None for _ in ctx.geometry)


def _out_size(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _fake_output(x, channels, kh, kw, stride, padding, dilation):
    """The (B, channels, Ho, Wo) output the kernels write: channels-last for a channels-last x."""
    ho = _out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    wo = _out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return torch.empty((x.shape[0], channels, ho, wo), dtype=x.dtype, device=x.device, memory_format=_layout(x))


def _fake_depthwise(x, kernels, bias, stride, padding, dilation):
    return _fake_output(x, x.shape[1], *kernels.shape[2:], stride, padding, dilation)


def _layout(x: torch.Tensor):
    """The C++ depthwise kernel's output layout: channels-last for a channels-last x."""
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


def _fake_per_sample(x, kernels, bias, stride, padding, dilation, groups):
    return _fake_output(x, kernels.shape[1], *kernels.shape[3:], stride, padding, dilation)


def _fake_per_sample_backward(grad, x, kernels, with_bias, *geometry):
    gb = x.new_empty((x.shape[0], kernels.shape[1])) if with_bias else x.new_empty((0,))
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))
    return gx, kernels.new_empty(kernels.shape), gb


if has_extension():
    for name, fake in (("per_sample_depthwise_conv2d", _fake_depthwise), ("per_sample_conv2d", _fake_per_sample)):
        register_kernel_pairs(
            [(f"dynkernels::{name}", f"dynkernels::{name}_backward")],
            fake=fake,
            fake_backward=_fake_per_sample_backward,
            setup_context=_per_sample_setup,
            backward=_per_sample_backward,
        )


# ---- the Triton backend: opaque custom ops (see ops/pointops.py) -------------


@torch.library.custom_op("dynkernels::dynamic_conv2d_triton", mutates_args=())
def _triton_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    routing: torch.Tensor,
    bias: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    kernel_scale: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    return family_kernels(FAMILY).forward(
        x, weight, routing, bias, in_scale, out_scale, kernel_scale, stride, padding, dilation, groups
    )


@torch.library.custom_op("dynkernels::dynamic_conv2d_backward_triton", mutates_args=())
def _triton_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    routing: torch.Tensor,
    in_scale: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    kernel_scale: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return family_kernels(FAMILY).backward(
        grad, x, weight, routing, in_scale, out_scale, kernel_scale, stride, padding, dilation, groups
    )


def _fake_triton(x, weight, routing, bias, in_scale, out_scale, kernel_scale, stride, padding, dilation, groups):
    return _fake_output(x, weight.shape[1], *weight.shape[3:], stride, padding, dilation)


def _fake_triton_backward(
    grad, x, weight, routing, in_scale, out_scale, kernel_scale, stride, padding, dilation, groups
):
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty((x.shape[0], *weight.shape[1:]), dtype=compute)


def _triton_setup(ctx, inputs, output):
    x, weight, routing, bias, in_scale, out_scale, kernel_scale, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, routing, bias, in_scale, out_scale, kernel_scale)
    ctx.geometry = (stride, padding, dilation, groups)


def _triton_chain(ctx, backward_op, grad):
    """dx and G (the folded kernels' gradient) from the Triton kernels, then
    the chain through the fold in closed form: G times the attentions gives
    the mixture's gradient H, whence W's (pi^T H) and the routing's (H W^T);
    G times the mixture M gives each attention's, summed over the other
    axes. Every reduction over the batch is a GEMM or a sum: deterministic."""
    x, weight, routing, bias, in_scale, out_scale, kernel_scale = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    grad = grad.contiguous()
    dx, gk = backward_op(grad, x, weight, routing, in_scale, out_scale, kernel_scale, stride, padding, dilation, groups)
    batch, experts = routing.shape
    _, cout, per_group = weight.shape[:3]
    pi, flat = routing.to(gk.dtype), weight.reshape(experts, -1).to(gk.dtype)
    factors = _scales(
        *(None if t is None else t.to(gk.dtype) for t in (in_scale, out_scale, kernel_scale)), groups, cout, per_group
    )
    scaled = gk if not factors else gk * _product(factors.values())
    g_weight = (pi.T @ scaled.reshape(batch, -1)).view(weight.shape)
    g_routing = scaled.reshape(batch, -1) @ flat.T
    g_bias = None
    if bias is not None:
        g_sum = grad.sum((2, 3), dtype=gk.dtype)
        g_bias = pi.T @ g_sum
        g_routing = g_routing + g_sum @ bias.to(gk.dtype).T
    g_scales = {}
    if factors:
        mixed = gk * (pi @ flat).view(gk.shape)
        others = lambda name: _product(f for n, f in factors.items() if n != name)
        for name in factors:
            rest = others(name)
            term = mixed if rest is None else mixed * rest
            if name == "out_scale":
                g_scales[name] = term.sum((2, 3, 4))
            elif name == "kernel_scale":
                g_scales[name] = term.sum((1, 2))
            else:  # (B, Cout, Cin/g) -> (B, groups, Cout/g, Cin/g) -> (B, Cin)
                g_scales[name] = (
                    term.sum((3, 4)).view(batch, groups, cout // groups, per_group).sum(2).reshape(batch, -1)
                )
    cast = lambda g, like: None if g is None else g.to(like.dtype)
    return (
        dx,
        cast(g_weight, weight),
        cast(g_routing, routing),
        cast(g_bias, weight),
        *(cast(g_scales.get(n), x) for n in ("in_scale", "out_scale", "kernel_scale")),
        None,
        None,
        None,
        None,
    )


register_kernel_pairs(
    [("dynkernels::dynamic_conv2d_triton", "dynkernels::dynamic_conv2d_backward_triton")],
    fake=_fake_triton,
    fake_backward=_fake_triton_backward,
    setup_context=_triton_setup,
    backward=_triton_chain,
)
