"""Dynamic convolution (CondConv, DY-CNN, ODConv) as one op (issue 13).

``dynamic_conv2d`` computes, for x (B, Cin, H, W), experts W (K, Cout,
Cin/g, kh, kw), routing pi (B, K), expert biases (K, Cout) and ODConv's
optional attentions (in_scale (B, Cin), out_scale (B, Cout), kernel_scale
(B, kh, kw)):

    y_b = out_scale_b ⊙ conv(in_scale_b ⊙ x_b, kernel_scale_b ⊙ Σ_k pi_bk W_k) + Σ_k pi_bk bias_k

Backends so far: "composite" (auto) and "reference" (the per-sample formula,
:func:`dynkernels.reference.dynamic_conv2d`). The composite folds all three
attentions into the per-sample kernels -- conv is linear in x and in the
kernel, so in_scale scales the kernels' input channels, out_scale their
output filters, kernel_scale their taps -- and runs one grouped convolution
(groups = B * groups) on them. It never builds the (B, K, Cout, Cin/g, kh, kw)
product that ODConv's code sums over K, nor the scaled copies of x and y:
the aggregated kernels (B, Cout, Cin/g, kh, kw) are the largest tensor it
holds. Autograd gives every gradient (x, weight, routing, bias and each
scale); the ones that reduce over the batch (weight, bias) are GEMMs
through the routing, deterministic on CPU. The C++ and Triton kernels
(issue 13) come next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from .._backends import resolve
from .._registry import register_op
from ._validation import check_floating, check_int, check_same_device, check_tensor

__all__ = ["dynamic_conv2d"]

FAMILY = "dynamic_conv"
register_op(
    "dynamic_conv2d",
    FAMILY,
    ("reference", "composite"),
    reference=reference.dynamic_conv2d,
    differentiable=("reference", "composite"),
)


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
    backend: None (auto: "composite") or "reference"."""
    groups = check_int("groups", groups, 1)
    stride, padding, dilation = _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    _check(x, weight, routing, bias, groups, in_scale, out_scale, kernel_scale)
    chosen = resolve("dynamic_conv2d", x.device, backend)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if chosen == "reference" or x.shape[0] == 0:
        return reference.dynamic_conv2d(
            x, weight, routing, bias, in_scale=in_scale, out_scale=out_scale, kernel_scale=kernel_scale, **geometry
        )
    return _folded(x, weight, routing, bias, in_scale, out_scale, kernel_scale, **geometry)


def _folded(x, weight, routing, bias, in_scale, out_scale, kernel_scale, *, stride, padding, dilation, groups):
    """The composite: the attentions folded into the per-sample kernels, one grouped conv."""
    batch, cin, h, w = x.shape
    experts, cout, per_group, kh, kw = weight.shape
    kernels = (routing @ weight.reshape(experts, -1)).view(batch, cout, per_group, kh, kw)
    scale = None  # the product of the attentions, broadcast against (B, Cout, Cin/g, kh, kw)
    if out_scale is not None:
        scale = out_scale[:, :, None, None, None]
    if in_scale is not None:
        # filter o of group o // (Cout/g) reads input channels (o // (Cout/g)) * Cin/g + j
        channels = in_scale.view(batch, groups, 1, per_group).expand(batch, groups, cout // groups, per_group)
        channels = channels.reshape(batch, cout, per_group, 1, 1)
        scale = channels if scale is None else scale * channels
    if kernel_scale is not None:
        taps = kernel_scale[:, None, None]
        scale = taps if scale is None else scale * taps
    if scale is not None:
        kernels = kernels * scale
    biases = (routing @ bias).reshape(-1) if bias is not None else None
    y = F.conv2d(
        x.reshape(1, batch * cin, h, w),
        kernels.reshape(batch * cout, per_group, kh, kw),
        biases,
        stride,
        padding,
        dilation,
        groups * batch,
    )
    return y.view(batch, cout, y.shape[-2], y.shape[-1])
