"""Dynamic convolution (issue 13), the reference layer: the per-sample formula
held to the public code's formulations in float64 -- timm's CondConv2d run
as is, and the groups = B trick with ODConv's (B, K, ...) kernel product --
over the geometries the kernels must cover. The kernels come next."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynkernels.reference import dynamic_conv2d, dynamic_conv2d_official

GEOMETRIES = [  # (Cin, Cout, k, stride, padding, dilation, groups, H, W)
    (8, 12, 1, 1, 0, 1, 1, 7, 9),  # 1x1 (MobileNet expand / project)
    (8, 8, 3, 1, 1, 1, 8, 9, 7),  # depthwise 3x3
    (6, 10, 3, 2, 1, 1, 1, 11, 8),  # stride 2, odd sizes
    (6, 6, 3, 1, 2, 2, 2, 10, 10),  # dilation 2, groups 2
    (4, 6, 5, 1, 2, 1, 1, 9, 9),  # 5x5
    (6, 6, 3, 2, 1, 1, 6, 9, 8),  # depthwise, stride 2, odd and even sizes
    (6, 6, 5, 1, 4, 2, 6, 12, 11),  # depthwise 5x5, dilation 2
    (4, 4, 2, 1, 0, 1, 4, 7, 6),  # depthwise 2x2 without padding
    (8, 12, 1, 2, 0, 1, 2, 9, 7),  # 1x1, stride 2, groups 2
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


# ---- the op: every backend of the registry against the reference ---------

from conftest import assert_clear_error, assert_close_to_float64, bad_input_params, kernel_cases  # noqa: E402

from dynkernels import ops  # noqa: E402

OP_CASES = [c for c in kernel_cases("dynamic_conv2d")]


@pytest.mark.parametrize("device,backend", OP_CASES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda c: f"c{c[0]}-{c[1]}-k{c[2]}-s{c[3]}-d{c[5]}-g{c[6]}")
def test_op_matches_the_reference(device, backend, geometry):
    """float64 to the formula; float32 within the two-times rule of torch's own error."""
    cin, cout, k, stride, padding, dilation, groups, h, w = geometry
    g = torch.Generator().manual_seed(cout * 10 + k)
    x, weight, routing, bias = _inputs(3, cin, cout, k, groups, 4, h, w, g)
    scales = dict(
        in_scale=torch.rand(3, cin, generator=g, dtype=torch.float64),
        out_scale=torch.rand(3, cout, generator=g, dtype=torch.float64),
        kernel_scale=torch.rand(3, k, k, generator=g, dtype=torch.float64),
    )
    geo = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    for kwargs in (dict(), dict(bias=bias), dict(bias=bias, **scales)):
        args = [t.to(device) for t in (x, weight, routing)]
        kw = {n: t.to(device) for n, t in kwargs.items()}
        truth = dynamic_conv2d(*args, **geo, **kw)
        got = ops.dynamic_conv2d(*args, **geo, **kw, backend=backend)
        torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12)
        args32 = [t.float() for t in args]
        kw32 = {n: t.float() for n, t in kw.items()}
        assert_close_to_float64(
            ops.dynamic_conv2d(*args32, **geo, **kw32, backend=backend), dynamic_conv2d(*args32, **geo, **kw32), truth
        )


@pytest.mark.parametrize("device,backend", OP_CASES)
@pytest.mark.parametrize(
    "channels,groups,geometry",
    [(6, 2, dict(stride=2, padding=1)), (3, 3, dict(stride=2, padding=2, dilation=2))],
    ids=["groups2-stride2", "depthwise-stride2-dilation2"],
)
def test_op_gradients_by_gradcheck(device, backend, channels, groups, geometry):
    """Every input, bias and all three attentions included; the depthwise case
    runs the C++ kernel's backward on the cpp backend."""
    g = torch.Generator().manual_seed(8 + groups)
    cin = 4 if groups == 2 else 3
    x, weight, routing, bias = _inputs(2, cin, channels, 3, groups, 3, 9, 8, g)
    attentions = [
        torch.rand(*shape, generator=g, dtype=torch.float64) for shape in ((2, cin), (2, channels), (2, 3, 3))
    ]
    leaves = [t.to(device).requires_grad_() for t in (x, weight, routing, bias, *attentions)]

    def fn(x, weight, routing, bias, a_c, a_f, a_s):
        scales = dict(in_scale=a_c, out_scale=a_f, kernel_scale=a_s)
        return ops.dynamic_conv2d(x, weight, routing, bias, groups=groups, **geometry, **scales, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves)


def test_cpp_depthwise_kernel_opcheck_and_thread_independence():
    if not any(c.values[1] == "cpp" for c in OP_CASES):
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5, 10, 9, generator=g).transpose(2, 3)  # non-contiguous
    kernels = torch.randn(3, 5, 3, 3, generator=g)
    bias = torch.randn(3, 5, generator=g)
    args = (x, kernels, bias, [2, 1], [1, 2], [1, 2])
    torch.library.opcheck(torch.ops.dynkernels.per_sample_depthwise_conv2d.default, args)
    torch.library.opcheck(
        torch.ops.dynkernels.per_sample_depthwise_conv2d.default,
        (x.double(), kernels.double(), None, [1, 1], [0, 0], [1, 1]),
    )
    runs, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            xs = x.clone().requires_grad_()
            y = torch.ops.dynkernels.per_sample_depthwise_conv2d(xs, kernels, bias, [2, 1], [1, 2], [1, 2])
            runs.append((y, *torch.autograd.grad(y.square().sum(), xs)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_op_compiles_fullgraph_and_handles_batches_of_one_and_none():
    g = torch.Generator().manual_seed(9)
    x, weight, routing, bias = _inputs(1, 4, 6, 3, 1, 4, 7, 7, g)

    depthwise = _inputs(1, 4, 4, 3, 4, 4, 7, 7, g)[1]

    def fn(x, routing):
        y = ops.dynamic_conv2d(x, weight, routing, bias, padding=1)
        return y.square().sum() + ops.dynamic_conv2d(x, depthwise, routing, padding=1, groups=4).sum()

    torch.testing.assert_close(torch.compile(fn, backend="aot_eager", fullgraph=True)(x, routing), fn(x, routing))
    assert ops.dynamic_conv2d(x[:0], weight, routing[:0], padding=1, stride=2).shape == (0, 6, 4, 4)


def _bad_dynamic_conv_cases():
    x = torch.randn(2, 4, 5, 5)
    weight, routing = torch.randn(3, 6, 4, 3, 3), torch.rand(2, 3)
    conv = ops.dynamic_conv2d
    return [
        ("routing of another batch", lambda: conv(x, weight, routing[:1]), ValueError, r"routing must be \(B, K\)"),
        ("routing of another K", lambda: conv(x, weight, routing[:, :2]), ValueError, r"routing must be \(B, K\)"),
        ("groups not dividing", lambda: conv(x, weight[:, :, :2], routing, groups=3), ValueError, "must divide"),
        ("weight of Cin/g", lambda: conv(x, weight[:, :, :3], routing), ValueError, "input channels"),
        ("weight rank", lambda: conv(x, weight[0], routing), ValueError, "weight must be"),
        ("bias shape", lambda: conv(x, weight, routing, torch.randn(6)), ValueError, "bias must be"),
        ("in_scale shape", lambda: conv(x, weight, routing, in_scale=torch.rand(2, 6)), ValueError, "in_scale"),
        ("out_scale shape", lambda: conv(x, weight, routing, out_scale=torch.rand(2, 4)), ValueError, "out_scale"),
        (
            "kernel_scale shape",
            lambda: conv(x, weight, routing, kernel_scale=torch.rand(2, 9)),
            ValueError,
            "kernel_scale",
        ),
        ("dtype mix", lambda: conv(x, weight.double(), routing), TypeError, "share a dtype"),
        ("device mix", lambda: conv(x, weight, routing.to("meta")), ValueError, "one device"),
        ("integer x", lambda: conv(x.long(), weight, routing), TypeError, "x must be a floating-point"),
        ("stride 0", lambda: conv(x, weight, routing, stride=0), ValueError, "stride"),
        ("numpy x", lambda: conv(x.numpy(), weight, routing), TypeError, "x must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("call,error,match", bad_input_params(_bad_dynamic_conv_cases()))
def test_op_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)


# ---- modules: drop-ins with the public code's parameter layouts ------------

from dynkernels import nn as dnn  # noqa: E402


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3), dict(kernel_size=1), dict(kernel_size=3, stride=2, groups=8)])
def test_condconv2d_loads_a_timm_state_dict_and_matches_timm(kwargs):
    timm_layers = pytest.importorskip("timm.layers")
    theirs = timm_layers.CondConv2d(8, 16, bias=True, num_experts=4, **kwargs).double()
    ours = dnn.CondConv2d(8, 16, bias=True, num_experts=4, **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 8, 11, 10, generator=g, dtype=torch.float64)
    routing = torch.sigmoid(torch.randn(3, 4, generator=g, dtype=torch.float64))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [theirs(xs[0], routing), ours(xs[1], routing)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    grads = [
        torch.autograd.grad(o.square().sum(), (xi, *m.parameters()))
        for o, xi, m in zip(outs, xs, (theirs, ours), strict=True)
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def _official_dy_cnn(module, x):
    """A float64 transcription of the official Dynamic_conv2d.forward
    (kaijieshi7/Dynamic-convolution-Pytorch): attention2d, then the batched
    grouped conv over the softmax mixture of the experts."""
    att = module.attention
    pooled = F.adaptive_avg_pool2d(x, 1)
    routing = torch.softmax(att.fc2(F.relu(att.fc1(pooled))).view(x.shape[0], -1) / module.temperature, 1)
    batch, cin, h, w = x.shape
    k = module.num_experts
    kernels = (routing @ module.weight.view(k, -1)).view(batch * module.out_channels, *module.expert_shape[1:])
    bias = (routing @ module.bias).view(-1) if module.bias is not None else None
    y = F.conv2d(
        x.view(1, -1, h, w), kernels, bias, module.stride, module.padding, module.dilation, module.groups * batch
    )
    return y.view(batch, module.out_channels, y.shape[-2], y.shape[-1])


@pytest.mark.parametrize(
    "geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=1, groups=4, stride=2)]
)
def test_dynamicconv2d_matches_the_official_forward_through_the_temperature_schedule(geometry):
    module = dnn.DynamicConv2d(8, 12, num_experts=4, **geometry).double()
    x = torch.randn(3, 8, 9, 9, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    temperatures = []
    for _ in range(13):  # 34 -> 1, then it stays at 1
        torch.testing.assert_close(module(x), _official_dy_cnn(module, x), rtol=1e-12, atol=1e-12)
        temperatures.append(module.temperature)
        module.update_temperature()
    assert temperatures == [34, 31, 28, 25, 22, 19, 16, 13, 10, 7, 4, 1, 1]
    assert set(module.state_dict()) == {
        "weight",
        "bias",
        "attention.fc1.weight",
        "attention.fc2.weight",
        "attention.fc2.bias",
    }
    assert module.attention.fc1.out_channels == int(8 * 0.25) + 1


def test_modules_check_their_arguments_at_construction():
    for build, error, match in (
        (lambda: dnn.CondConv2d(8, 12, 3, groups=3), ValueError, "groups=3 must divide"),
        (lambda: dnn.CondConv2d(8, 12, 3, num_experts=0), ValueError, "num_experts"),
        (lambda: dnn.CondConv2d(8, 12, 3, backend="gpu"), ValueError, "backend must be"),
        (lambda: dnn.DynamicConv2d(8, 12, 3, temperature=30), ValueError, "temperature"),
        (lambda: dnn.DynamicConv2d(8.0, 12, 3), TypeError, "in_channels"),
    ):
        with pytest.raises(error, match=match):
            build()
