"""Benchmark cases of dynamic convolution (issue 13): dynkernels against the
public code's formulation (timm's CondConv2d, i.e. one conv with
groups = B over routing @ W; with ODConv's attentions, its
(B, K, Cout, Cin/g, k, k) product and the scaled copies of x and y), the
per-sample loop (the reference), and a static nn.Conv2d of the same shape,
the floor: a dynamic conv does the static conv's multiply-adds plus the
K-way mix of the kernels. Forward and forward+backward, time and peak memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..reference import dynamic_conv as ref
from .base import Case as _case
from .base import Impl as _impl

FAMILY = "dynamic_conv"
IM2COL = "dynkernels backend='cpp' (C++ im2col + GEMM)"

# (label, B, Cin, Cout, k, stride, groups, H, K); "channels-last" in a label runs every
# implementation (the static conv included) on a channels-last x
DEFAULT = (
    ("MobileNetV2 1x1 expand 24->144 @56", 8, 24, 144, 1, 1, 1, 56, 4),
    ("MobileNetV2 depthwise 3x3 144 @56", 8, 144, 144, 3, 1, 144, 56, 4),
    ("MobileNetV2 depthwise 3x3 144 @56 channels-last", 8, 144, 144, 3, 1, 144, 56, 4),
    ("ResNet-50 3x3 64->64 @56", 8, 64, 64, 3, 1, 1, 56, 4),
    ("ResNet-50 3x3 64->64 @56 channels-last", 8, 64, 64, 3, 1, 1, 56, 4),
)
QUICK = (("1x1 16->32 @14", 2, 16, 32, 1, 1, 1, 14, 4), ("depthwise 3x3 32 @14", 2, 32, 32, 3, 1, 32, 14, 4))
FULL = DEFAULT + (
    ("MobileNetV2 1x1 project 144->24 @56", 8, 144, 24, 1, 1, 1, 56, 4),
    ("ResNet-50 3x3 64->64 @56 K=8", 8, 64, 64, 3, 1, 1, 56, 8),
    ("ResNet-50 3x3 128->128 @28 B=32", 32, 128, 128, 3, 1, 1, 28, 4),
    ("ResNet-50 3x3 256->256 @14", 8, 256, 256, 3, 1, 1, 14, 4),
    ("ResNet-50 3x3 256->256 @14 channels-last", 8, 256, 256, 3, 1, 1, 14, 4),
    ("MobileNetV2 depthwise 3x3 144 @56 B=32", 32, 144, 144, 3, 1, 144, 56, 4),
    ("MobileNetV2 depthwise 3x3 144 @56 B=32 channels-last", 32, 144, 144, 3, 1, 144, 56, 4),
    ("MobileNetV2 1x1 expand 24->144 @56 channels-last", 8, 24, 144, 1, 1, 1, 56, 4),
)


def conv_setup(
    batch, cin, cout, k, stride, groups, size, experts, odconv: bool, backward: bool, device: str, channels_last=False
):
    g = torch.Generator().manual_seed(batch * 1000 + cin + cout + k)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, cin, size, size, generator=g).to(device, memory_format=fmt).requires_grad_(backward)
    weight = (0.1 * torch.randn(experts, cout, cin // groups, k, k, generator=g)).to(device).requires_grad_(backward)
    routing = torch.rand(batch, experts, generator=g).to(device).requires_grad_(backward)
    static = (0.1 * torch.randn(cout, cin // groups, k, k, generator=g)).to(device).requires_grad_(backward)
    scales = {}
    if odconv:
        scales = dict(
            in_scale=torch.rand(batch, cin, generator=g).to(device).requires_grad_(backward),
            out_scale=torch.rand(batch, cout, generator=g).to(device).requires_grad_(backward),
            kernel_scale=torch.rand(batch, k, k, generator=g).to(device).requires_grad_(backward),
        )
    geometry = dict(stride=stride, padding=k // 2, groups=groups)
    leaves = [t for t in (x, weight, routing, *scales.values()) if t.requires_grad]

    def run(fn):
        def call():
            y = fn()
            if backward:
                return torch.autograd.grad(y.sum(), [t for t in leaves if t is not None] or [x])
            return y

        return call

    ours = run(lambda: ops.dynamic_conv2d(x, weight, routing, **geometry, **scales))
    official = run(lambda: ref.dynamic_conv2d_official(x, weight, routing, **geometry, **scales))
    loop = run(lambda: ref.dynamic_conv2d(x, weight, routing, **geometry, **scales))
    plain = lambda: F.conv2d(x, static, None, geometry["stride"], geometry["padding"], 1, groups)  # noqa: E731
    static_call = (lambda: torch.autograd.grad(plain().sum(), (x, static))) if backward else plain
    with torch.no_grad():
        a = ops.dynamic_conv2d(x, weight, routing, **geometry, **scales)
        b = ref.dynamic_conv2d(x, weight, routing, **geometry, **scales)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
        raise AssertionError("dynamic_conv2d disagrees with the reference; refusing to time a wrong kernel")
    name = "official ODConv" if odconv else "timm CondConv2d (groups=B)"
    variant = []
    if device == "cpu" and k > 1 and not groups == cin == cout:  # general kxk: the C++ im2col kernel
        im2col = run(lambda: ops.dynamic_conv2d(x, weight, routing, **geometry, **scales, backend="cpp"))
        with torch.no_grad():
            same = torch.allclose(
                ops.dynamic_conv2d(x, weight, routing, **geometry, **scales, backend="cpp"), b, 1e-4, 1e-4
            )
        if not same:
            raise AssertionError("dynamic_conv2d(backend='cpp') disagrees with the reference")
        variant = [_impl(IM2COL, im2col, "variant", True, "per_sample_conv2d", measure_memory=True)]
    return [
        _impl("dynkernels", ours, "kernel", measure_memory=True),
        *variant,
        _impl("reference (per-sample loop)", loop, "reference", measure_memory=True),
        _impl(name, official, "anchor", True, measure_memory=True),
        _impl("static nn.Conv2d (floor)", static_call, "anchor", None, "same shape, one kernel", measure_memory=True),
    ]


def cases(size: str, device: str) -> list:
    sizes = {"quick": QUICK, "default": DEFAULT}.get(size, FULL)
    out = []
    for label, b, cin, cout, k, stride, groups, hw, experts in sizes:
        for odconv in (False, True):
            for backward in (False, True):
                if odconv and size == "default" and not backward:
                    continue  # the default run keeps ODConv's training step only
                op = ("odconv" if odconv else "condconv") + (" fwd+bwd" if backward else " fwd")
                ho = (hw + 2 * (k // 2) - k) // stride + 1
                macs = b * cout * ho * ho * (cin // groups) * k * k
                out.append(
                    _case(
                        FAMILY,
                        f"dynamic_conv2d {op}",
                        f"{label} B={b} K={experts}",
                        lambda a=(b, cin, cout, k, stride, groups, hw, experts, odconv, backward, label): conv_setup(
                            *a[:-1], device, "channels-last" in a[-1]
                        ),
                        dict(
                            B=b,
                            Cin=cin,
                            Cout=cout,
                            k=k,
                            stride=stride,
                            groups=groups,
                            H=hw,
                            K=experts,
                            layout="NHWC" if "channels-last" in label else "NCHW",
                        ),
                        (
                            "dynkernels",
                            *((IM2COL,) if device == "cpu" and k > 1 and groups != cin else ()),
                            "reference (per-sample loop)",
                            "official ODConv" if odconv else "timm CondConv2d (groups=B)",
                            "static nn.Conv2d (floor)",
                        ),
                        floor_bytes=4 * (b * cin * hw * hw + b * cout * ho * ho),
                        floor_flops=2 * macs * (3 if backward else 1),
                    )
                )
    return out
