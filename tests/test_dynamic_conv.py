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

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=backend == "triton" and device == "cpu")


CHANNELS_LAST = [  # (C in, C out, groups, k, stride, padding, dilation)
    (6, 8, 2, 3, 2, 1, 1),
    (6, 6, 6, 3, 2, 1, 1),
    (70, 70, 70, 3, 1, 1, 1),  # depthwise: a full channel block of the C++ kernel and a tail
    (70, 70, 70, 5, 2, 4, 2),
    (9, 9, 9, 2, 1, 0, 1),
    (12, 20, 1, 1, 2, 0, 1),  # 1x1: the (B, HW, Cin) GEMM
]


@pytest.mark.parametrize("device,backend", OP_CASES)
@pytest.mark.parametrize("geometry", CHANNELS_LAST, ids=lambda c: f"c{c[0]}-{c[1]}-g{c[2]}-k{c[3]}-s{c[4]}-d{c[6]}")
def test_op_takes_channels_last_inputs(device, backend, geometry):
    """A channels-last x gives the formula's values and gradients (float64),
    and float32 within the two-times rule (the C++ depthwise kernel and the
    Triton kernels address x by strides and write y channels-last)."""
    cin, cout, groups, k, stride, padding, dilation = geometry
    g = torch.Generator().manual_seed(21 + cin + k)
    x, weight, routing, bias = (t.to(device) for t in _inputs(2, cin, cout, k, groups, 4, 11, 9, g))
    a_c = torch.rand(2, cin, generator=g, dtype=torch.float64).to(device)
    geo = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, in_scale=a_c)
    outs = []
    for xi, fn in ((x, dynamic_conv2d), (x.to(memory_format=torch.channels_last), ops.dynamic_conv2d)):
        leaf = xi.clone(memory_format=torch.preserve_format).requires_grad_()
        w = weight.clone().requires_grad_()
        kw = dict(backend=backend) if fn is ops.dynamic_conv2d else {}
        y = fn(leaf, w, routing, bias, **geo, **kw)
        outs.append((y, *torch.autograd.grad(y.square().sum(), (leaf, w))))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    x32 = x.float().to(memory_format=torch.channels_last)
    args32 = [t.float() for t in (weight, routing, bias)]
    geo32 = dict(geo, in_scale=a_c.float())
    assert_close_to_float64(
        ops.dynamic_conv2d(x32, *args32, **geo32, backend=backend),
        dynamic_conv2d(x.float(), *args32, **geo32),
        outs[0][0],
    )


def test_cpp_channels_last_depthwise_gradcheck_and_thread_independence():
    if not any(c.values[1] == "cpp" for c in OP_CASES):
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(23)
    op = torch.ops.dynkernels.per_sample_depthwise_conv2d
    x = torch.randn(2, 5, 7, 6, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
    kernels = torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 5, generator=g, dtype=torch.float64)
    leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, kernels, bias)]
    assert torch.autograd.gradcheck(lambda a, b, c: op(a, b, c, [2, 1], [1, 2], [1, 2]), leaves)
    assert op(x, kernels, bias, [1, 1], [1, 1], [1, 1]).is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(op.default, (x.float(), kernels.float(), bias.float(), [2, 1], [1, 2], [1, 2]))
    big = torch.randn(3, 80, 17, 15, generator=g).to(memory_format=torch.channels_last)
    kb, bb = torch.randn(3, 80, 3, 3, generator=g), torch.randn(3, 80, generator=g)
    runs, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            xs, ks, bs = (t.clone(memory_format=torch.preserve_format).requires_grad_() for t in (big, kb, bb))
            y = op(xs, ks, bs, [1, 1], [1, 1], [1, 1])
            runs.append((y, *torch.autograd.grad(y.square().sum(), (xs, ks, bs))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_triton_ops_pass_opcheck():
    if not any(c.values[1] == "triton" for c in OP_CASES):
        pytest.skip("Triton is not usable here")
    g = torch.Generator().manual_seed(22)
    x, weight, routing, bias = _inputs(2, 4, 6, 3, 2, 3, 7, 6, g)
    scales = [torch.rand(*shape, generator=g, dtype=torch.float64) for shape in ((2, 4), (2, 6), (2, 3, 3))]
    forward = torch.ops.dynkernels.dynamic_conv2d_triton.default
    torch.library.opcheck(forward, (x, weight, routing, bias, *scales, [2, 1], [1, 1], [1, 2], 2))
    channels_last = x.to(memory_format=torch.channels_last)  # the fake kernel keeps y's layout
    torch.library.opcheck(forward, (channels_last, weight, routing, bias, *scales, [1, 1], [1, 1], [1, 1], 2))
    torch.library.opcheck(
        forward, (x.float(), weight.float(), routing.float(), None, None, None, None, [1, 1], [0, 0], [1, 1], 2)
    )


DEPTHWISE_NCHW = [  # (H, W, k, stride, padding, dilation): the C++ NCHW depthwise paths
    (9, 70, 3, (1, 1), (1, 1), (1, 1)),  # stride 1: two full 32-column chunks and an overlapping last one
    (40, 33, 3, (2, 1), (1, 1), (1, 1)),  # row stride 2, column stride 1: still the padded path
    (12, 11, 5, (1, 1), (4, 2), (2, 1)),  # dilation, asymmetric padding; 11 columns: a narrower chunk
    (6, 3, 2, (1, 1), (0, 1), (1, 1)),  # narrower than any vector
    (7, 20, 3, (1, 2), (1, 1), (1, 1)),  # column stride 2: the row-axpy path
    (8, 9, 3, (1, 1), (3, 1), (1, 1)),  # padding > d (k - 1): the padded forward, the scatter backward
]


@pytest.mark.parametrize("geometry", DEPTHWISE_NCHW, ids=lambda c: f"{c[0]}x{c[1]}-k{c[2]}-s{c[3][0]}{c[3][1]}")
def test_cpp_nchw_depthwise_kernel_equals_the_conv(geometry):
    """float64 values and gradients equal F.conv2d run per sample (1e-12), float32
    within the two-times rule, on every chunk width and stride of the kernel."""
    if not any(c.values[1] == "cpp" for c in OP_CASES):
        pytest.skip("the C++ extension is not built")
    h, w, k, stride, padding, dilation = geometry
    g = torch.Generator().manual_seed(h * w + k)
    op = torch.ops.dynkernels.per_sample_depthwise_conv2d
    x = torch.randn(2, 5, h, w, generator=g, dtype=torch.float64)
    kernels = torch.randn(2, 5, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 5, generator=g, dtype=torch.float64)

    def conv(x, kernels, bias):
        return torch.cat(
            [F.conv2d(x[b : b + 1], kernels[b, :, None], bias[b], stride, padding, dilation, 5) for b in range(2)]
        )

    leaves = [t.clone().requires_grad_() for t in (x, kernels, bias)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, kernels, bias)]
    y, truth = op(*leaves, list(stride), list(padding), list(dilation)), conv(*ref_leaves)
    torch.testing.assert_close(y, truth, rtol=1e-12, atol=1e-12)
    gy = torch.randn(truth.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(truth, ref_leaves, gy), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    f32 = [t.float() for t in (x, kernels, bias)]
    assert_close_to_float64(op(*f32, list(stride), list(padding), list(dilation)), conv(*f32), truth)


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
    for geometry in (([2, 1], [1, 2], [1, 2]), ([1, 1], [1, 2], [1, 2])):  # the scatter and the padded backward
        runs, threads = [], torch.get_num_threads()
        try:
            for count in (1, 2):
                torch.set_num_threads(count)
                leaves = [t.clone().requires_grad_() for t in (x, kernels, bias)]
                y = torch.ops.dynkernels.per_sample_depthwise_conv2d(*leaves, *geometry)
                runs.append((y, *torch.autograd.grad(y.square().sum(), leaves)))
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cpp_general_kernel_over_row_blocks_opcheck_and_reproducibility(layout):
    """per_sample_conv2d (im2col + GEMM by output-row blocks of 2^18 elements):
    Cin/g = 32 at 3x3 is a depth of 288, so 64 output columns make 14-row
    blocks and 40 rows three blocks, the last one short. float64 values and
    every gradient equal F.conv2d run per sample; opcheck; bitwise the same
    from run to run at 1 and at 2 threads. (Not across thread counts: MKL's
    GEMMs, like torch's own conv and matmul, may round differently when the
    pool has another size -- measured on dK of the channels-last layout.)"""
    if not any(c.values[1] == "cpp" for c in OP_CASES):
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(31)
    op = torch.ops.dynkernels.per_sample_conv2d
    x = torch.randn(2, 64, 40, 64, generator=g, dtype=torch.float64).to(memory_format=layout)
    kernels = torch.randn(2, 10, 32, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 10, generator=g, dtype=torch.float64)
    geometry = ([1, 1], [1, 1], [1, 1], 2)
    leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, kernels, bias)]
    y = op(*leaves, *geometry)
    assert y.is_contiguous(memory_format=layout)
    truth = torch.cat([F.conv2d(x[b : b + 1], kernels[b], bias[b], 1, 1, 1, 2) for b in range(2)])
    torch.testing.assert_close(y, truth, rtol=1e-12, atol=1e-12)
    gy = torch.randn(truth.shape, generator=g, dtype=torch.float64)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, kernels, bias)]
    ref = torch.cat(
        [F.conv2d(ref_leaves[0][b : b + 1], ref_leaves[1][b], ref_leaves[2][b], 1, 1, 1, 2) for b in range(2)]
    )
    for got, want in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, ref_leaves, gy), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    small = torch.randn(2, 4, 7, 6, generator=g).to(memory_format=layout)
    small_kernels, small_bias = torch.randn(2, 6, 2, 3, 2, generator=g), torch.randn(2, 6, generator=g)
    torch.library.opcheck(op.default, (small, small_kernels, small_bias, [2, 1], [1, 2], [1, 2], 2))
    torch.library.opcheck(op.default, (small.double(), small_kernels.double(), None, [1, 1], [0, 0], [1, 1], 2))
    runs, threads = {1: [], 2: []}, torch.get_num_threads()
    try:
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            xs, ks, bs = (
                t.float().clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, kernels, bias)
            )
            out = op(xs, ks, bs, *geometry)
            runs[count].append((out, *torch.autograd.grad(out.square().sum(), (xs, ks, bs))))
    finally:
        torch.set_num_threads(threads)
    for first, second in runs.values():
        for a, b in zip(first, second, strict=True):
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


def _official_odconv(module, x):
    """A float64 transcription of the official ODConv2d forward
    (OSVAI/ODConv modules/odconv.py): the attention branch (GAP, fc, BN,
    ReLU, four heads over the temperature; a skipped head is 1), then
    ``_forward_impl_common``: x scaled by the channel attention, the
    (B, K, Cout, Cin/g, k, k) product of spatial and kernel attentions with
    the experts summed over K, one conv with groups = B * groups, and the
    filter attention on the output; a 1x1 layer with K = 1 takes the official
    ``_forward_impl_pw1x`` instead (one conv with the shared kernel)."""
    att, batch = module.attention, x.shape[0]
    h = F.relu(att.bn(att.fc(x.mean((2, 3), keepdim=True))))
    t = att.temperature
    channel = torch.sigmoid(att.channel_fc(h).view(batch, -1, 1, 1) / t)
    filt = 1.0 if att.filter_fc is None else torch.sigmoid(att.filter_fc(h).view(batch, -1, 1, 1) / t)
    k = module.kernel_size
    spatial = 1.0 if att.spatial_fc is None else torch.sigmoid(att.spatial_fc(h).view(batch, 1, 1, 1, *k) / t)
    kernel = 1.0 if att.kernel_fc is None else torch.softmax(att.kernel_fc(h).view(batch, -1, 1, 1, 1, 1) / t, 1)
    if k == (1, 1) and module.kernel_num == 1:  # the official _forward_impl_pw1x: one shared 1x1 kernel
        y = F.conv2d(x * channel, module.weight[0], None, module.stride, module.padding, module.dilation, module.groups)
        return y * filt
    aggregate = (spatial * kernel * module.weight.unsqueeze(0)).sum(1)
    xs = (x * channel).reshape(1, -1, *x.shape[2:])
    y = F.conv2d(
        xs,
        aggregate.reshape(-1, *aggregate.shape[2:]),
        None,
        module.stride,
        module.padding,
        module.dilation,
        module.groups * batch,
    )
    return y.view(batch, module.out_channels, *y.shape[-2:]) * filt


ODCONV_CASES = {  # (in, out, k, kwargs): the official code's four paths
    "3x3": (16, 24, 3, dict(padding=1)),
    "3x3-stride2-groups2-K8": (16, 24, 3, dict(padding=1, stride=2, groups=2, kernel_num=8)),
    "depthwise": (32, 32, 3, dict(padding=1, groups=32)),  # no filter attention
    "1x1": (16, 40, 1, dict()),  # no spatial attention
    "1x1-K1": (16, 40, 1, dict(kernel_num=1)),  # the official pw1x path: no kernel attention either
    "5x5-dilation2-K1": (8, 8, 5, dict(padding=4, dilation=2, kernel_num=1, reduction=0.5)),
}


@pytest.mark.parametrize("case", list(ODCONV_CASES), ids=list(ODCONV_CASES))
def test_odconv2d_matches_the_official_forward_and_state_dict(case):
    cin, cout, k, kwargs = ODCONV_CASES[case]
    module = dnn.ODConv2d(cin, cout, k, **kwargs).double()
    kernel_num = kwargs.get("kernel_num", 4)
    depthwise = kwargs.get("groups", 1) == cin == cout
    want_keys = {"weight", "attention.fc.weight", "attention.channel_fc.weight", "attention.channel_fc.bias"}
    want_keys |= {f"attention.bn.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    for head, present in (("filter_fc", not depthwise), ("spatial_fc", k > 1), ("kernel_fc", kernel_num > 1)):
        if present:
            want_keys |= {f"attention.{head}.weight", f"attention.{head}.bias"}
    assert set(module.state_dict()) == want_keys
    assert module.weight.shape == (kernel_num, cout, cin // kwargs.get("groups", 1), k, k)
    assert module.attention.fc.out_channels == max(int(cin * kwargs.get("reduction", 0.0625)), 16)
    g = torch.Generator().manual_seed(cin + k)
    with torch.no_grad():  # off the official init (zero biases, BN at identity) so that every term is exercised
        for p in module.attention.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    x = torch.randn(3, cin, 9, 8, generator=g, dtype=torch.float64)
    for temperature, train in ((1.0, True), (1.0, False), (7.0, True)):
        module.update_temperature(temperature)
        module.train(train)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [_official_odconv(module, xs[0]), module(xs[1])]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
        grads = [
            torch.autograd.grad(o.square().sum(), (xi, *module.parameters())) for o, xi in zip(outs, xs, strict=True)
        ]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_odconv2d_loads_a_state_dict_with_the_official_names():
    source = dnn.ODConv2d(16, 24, 3, padding=1).double()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    for name in state:
        if state[name].is_floating_point():
            state[name] = torch.randn(state[name].shape, generator=g, dtype=torch.float64)
    state["attention.bn.running_var"] = state["attention.bn.running_var"].abs() + 0.5
    target = dnn.ODConv2d(16, 24, 3, padding=1).double().eval()
    target.load_state_dict(state)
    x = torch.randn(2, 16, 7, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(target(x), _official_odconv(target, x), rtol=1e-12, atol=1e-12)


def test_condconvblock_routes_by_the_sigmoid_of_a_linear_on_the_pooled_input():
    block = dnn.CondConvBlock(8, 12, 3, padding=1, bias=True, num_experts=4).double()
    x = torch.randn(2, 8, 7, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    routing = torch.sigmoid(x.mean((2, 3)) @ block.routing_fn.weight.T + block.routing_fn.bias)
    want = dynamic_conv2d(x, block.conv.weight.view(4, 12, 8, 3, 3), routing, block.conv.bias, padding=1)
    torch.testing.assert_close(block(x), want, rtol=1e-12, atol=1e-12)


CONVERT_CONVS = {
    "3x3-bias": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, bias=True),
    "depthwise-stride2": dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1, groups=8, bias=False),
    "1x1": dict(in_channels=8, out_channels=16, kernel_size=1, bias=False),
    "5x5-same-dilation2": dict(in_channels=4, out_channels=6, kernel_size=5, padding="same", dilation=2, groups=2),
}


@pytest.mark.parametrize("kind", ["condconv", "dycnn", "odconv"])
@pytest.mark.parametrize("conv", list(CONVERT_CONVS), ids=list(CONVERT_CONVS))
def test_convert_conv2d_computes_the_original_conv_and_breaks_the_expert_symmetry(kind, conv):
    torch.manual_seed(5)
    original = torch.nn.Conv2d(**CONVERT_CONVS[conv]).double()
    x = torch.randn(3, original.in_channels, 10, 9, dtype=torch.float64)
    for experts in (1, 4):
        dynamic = dnn.convert_conv2d(original, experts, kind)
        torch.testing.assert_close(dynamic(x), original(x), rtol=1e-12, atol=1e-12)
        dynamic(x).square().sum().backward()
        if experts == 1:
            continue
        # the symmetry breaks: CondConv's router rows (its experts differ by the zero-sum noise), the
        # other kinds' experts (their softmax routers differ from the start)
        grad = dynamic.routing_fn.weight.grad if kind == "condconv" else dynamic.weight.grad
        assert not torch.allclose(grad[0], grad[1])
        if kind == "condconv":  # without the noise, identical experts under an identical router stay identical
            copies = dnn.convert_conv2d(original, experts, kind, noise=0.0)
            copies(x).square().sum().backward()
            torch.testing.assert_close(copies.routing_fn.weight.grad[0], copies.routing_fn.weight.grad[1])


def test_convert_model_turns_a_torchvision_mobilenet_v2_dynamic_at_its_original_output():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(6)
    # training mode: BatchNorm on batch statistics keeps the features O(1) through all 52 convs
    model = torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10, dropout=0.0).double().train()
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64)
    want = model(x)
    convs = sum(type(m) is torch.nn.Conv2d for m in model.modules())
    dnn.convert_model(model, 4, "condconv")
    assert sum(isinstance(m, dnn.CondConvBlock) for m in model.modules()) == convs == 52
    assert not any(type(m) is torch.nn.Conv2d for m in model.modules())
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)


def test_conversion_errors_are_clear():
    conv = torch.nn.Conv2d(4, 4, 3)
    for call, error, match in (
        (lambda: dnn.convert_conv2d(conv, 4, "moe"), ValueError, "kind must be one of"),
        (lambda: dnn.convert_conv2d(torch.nn.Linear(2, 2)), TypeError, "takes an nn.Conv2d"),
        (lambda: dnn.convert_conv2d(conv, 0), ValueError, "num_experts"),
        (lambda: dnn.convert_conv2d(conv, noise=-1.0), ValueError, "noise"),
        (
            lambda: dnn.convert_conv2d(torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")),
            ValueError,
            "padding_mode",
        ),
        (lambda: dnn.convert_conv2d(torch.nn.Conv2d(4, 4, 2, padding="same")), ValueError, "asymmetric"),
        (
            lambda: dnn.convert_model(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding_mode="circular"))),
            ValueError,
            "cannot convert '0'",
        ),
        (lambda: dnn.convert_model(conv), TypeError, "convert_conv2d"),
        (lambda: dnn.ODConv2d(8, 8, 3, reduction=0), ValueError, "reduction"),
    ):
        with pytest.raises(error, match=match):
            call()
