"""Dynamic convolution (issue 13), the reference layer: the per-sample formula
held to the public code's formulations in float64 -- timm's CondConv2d run
as is, and the groups = B trick with ODConv's (B, K, ...) kernel product --
over the geometries the kernels must cover. The kernels come next."""

from __future__ import annotations

import pytest
import torch

from dynkernels.reference import dynamic_conv2d, dynamic_conv2d_official

GEOMETRIES = [  # (Cin, Cout, k, stride, padding, dilation, groups, H, W)
    (8, 12, 1, 1, 0, 1, 1, 7, 9),  # 1x1 (MobileNet expand / project)
    (8, 8, 3, 1, 1, 1, 8, 9, 7),  # depthwise 3x3
    (6, 10, 3, 2, 1, 1, 1, 11, 8),  # stride 2, odd sizes
    (6, 6, 3, 1, 2, 2, 2, 10, 10),  # dilation 2, groups 2
    (4, 6, 5, 1, 2, 1, 1, 9, 9),  # 5x5
]


def _inputs(batch, cin, cout, k, groups, experts, h, w, g):
    x = torch.randn(batch, cin, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(experts, cout, cin // groups, k, k, generator=g, dtype=torch.float64)
    routing = torch.rand(batch, experts, generator=g, dtype=torch.float64)
    bias = torch.randn(experts, cout, generator=g, dtype=torch.float64)
    return x, weight, routing, bias


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda c: f"c{c[0]}-{c[1]}-k{c[2]}-s{c[3]}-d{c[5]}-g{c[6]}")
@pytest.mark.parametrize("experts", [1, 4, 8])
def test_formula_equals_the_grouped_formulation_with_odconv_attentions(geometry, experts):
    cin, cout, k, stride, padding, dilation, groups, h, w = geometry
    g = torch.Generator().manual_seed(cin * 100 + k * 10 + experts)
    for batch in (1, 3):
        x, weight, routing, bias = _inputs(batch, cin, cout, k, groups, experts, h, w, g)
        scales = dict(
            in_scale=torch.rand(batch, cin, generator=g, dtype=torch.float64),
            out_scale=torch.rand(batch, cout, generator=g, dtype=torch.float64),
            kernel_scale=torch.rand(batch, k, k, generator=g, dtype=torch.float64),
        )
        geo = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        for kwargs in (dict(), dict(bias=bias), scales):
            want = dynamic_conv2d_official(x, weight, routing, **geo, **kwargs)
            got = dynamic_conv2d(x, weight, routing, **geo, **kwargs)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=["1x1", "depthwise", "stride2"])
def test_formula_equals_timm_condconv2d(geometry):
    timm_layers = pytest.importorskip("timm.layers")
    cin, cout, k, stride, padding, dilation, groups, h, w = geometry
    layer = timm_layers.CondConv2d(
        cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=True, num_experts=4
    ).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, cin, h, w, generator=g, dtype=torch.float64)
    routing = torch.sigmoid(torch.randn(3, 4, generator=g, dtype=torch.float64))
    weight = layer.weight.detach().view(4, cout, cin // groups, k, k)  # timm's layout: (K, Cout * Cin/g * kh * kw)
    want = layer(x, routing)
    got = dynamic_conv2d(
        x, weight, routing, layer.bias.detach(), stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradients_of_the_formula_match_the_grouped_formulation():
    g = torch.Generator().manual_seed(6)
    x, weight, routing, bias = _inputs(2, 4, 6, 3, 2, 4, 6, 5, g)
    scales = [
        torch.rand(2, 4, dtype=torch.float64),
        torch.rand(2, 6, dtype=torch.float64),
        torch.rand(2, 3, 3, dtype=torch.float64),
    ]
    leaves = [t.requires_grad_() for t in (x, weight, routing, bias, *scales)]
    grads = []
    for fn in (dynamic_conv2d, dynamic_conv2d_official):
        y = fn(*leaves[:4], padding=1, groups=2, in_scale=leaves[4], out_scale=leaves[5], kernel_scale=leaves[6])
        grads.append(torch.autograd.grad(y.square().sum(), leaves))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_an_empty_batch_has_the_conv_shape():
    g = torch.Generator().manual_seed(7)
    x, weight, routing, _ = _inputs(0, 6, 10, 3, 1, 4, 11, 8, g)
    assert dynamic_conv2d(x, weight, routing, stride=2, padding=1).shape == (0, 10, 6, 4)
