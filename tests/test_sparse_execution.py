"""Spatially sparse execution (issue 14), part 1: mask compaction, pixel
gather/scatter, DynConv's Gumbel gate and sparsity loss -- every backend held
to the reference (exact indices; copies exact), the reference held to float64
transcriptions of DynConv's ExpandMask, Gumbel and SparsityCriterion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_clear_error, assert_close_to_float64, bad_input_params, kernel_cases

from dynkernels import ops
from dynkernels.reference import sparse_execution as ref

MASK_CASES = kernel_cases("mask_to_index")
GATHER_CASES = kernel_cases("gather_pixels")
SCATTER_CASES = kernel_cases("scatter_pixels")


def _masks():
    """(name, mask) pairs: densities 0, 1 and between, one pixel at a corner and
    at a border, a full row, odd sizes, a batch of one."""
    g = torch.Generator().manual_seed(5)
    out = [
        ("empty", torch.zeros(2, 1, 7, 9, dtype=torch.bool)),
        ("full", torch.ones(2, 1, 7, 9, dtype=torch.bool)),
        ("density-0.3", torch.rand(3, 1, 11, 13, generator=g) < 0.3),
        ("density-0.05-b1", torch.rand(1, 1, 17, 15, generator=g) < 0.05),
    ]
    corner = torch.zeros(2, 1, 8, 6, dtype=torch.bool)
    corner[1, 0, 7, 5] = True
    border = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    border[0, 0, 4, 0] = True
    row = torch.zeros(2, 1, 6, 10, dtype=torch.bool)
    row[0, 0, 2] = True
    out += [("corner", corner), ("border", border), ("full-row", row)]
    return out


MASKS = _masks()


def _expand_mask_official(mask: torch.Tensor, padding: int) -> torch.Tensor:
    """DynConv's ExpandMask at stride 1, transcribed: a ones kernel of side
    1 + 2 padding, conv2d with that padding, > 0.5."""
    kernel = torch.ones(1, 1, 1 + 2 * padding, 1 + 2 * padding, dtype=torch.float64)
    return F.conv2d(mask.to(torch.float64), kernel, padding=padding, stride=1) > 0.5


@pytest.mark.parametrize("halo", [0, 1, 2])
@pytest.mark.parametrize("name,mask", MASKS, ids=[n for n, _ in MASKS])
def test_reference_compaction_is_nonzero_of_the_official_dilated_mask(name, mask, halo):
    dilated = _expand_mask_official(mask, halo) if halo else mask
    index, count, table = ref.mask_to_index(mask, halo=halo, inverse=True)
    assert torch.equal(index, torch.nonzero(dilated.reshape(-1)).reshape(-1))
    assert int(count) == int(dilated.sum())
    flat = table.reshape(-1)
    assert torch.equal(flat[index], torch.arange(index.numel()))
    assert bool((flat[~dilated.reshape(-1)] == -1).all())
    # an independent dilation: max pooling
    pooled = F.max_pool2d(mask.float(), 2 * halo + 1, 1, halo) > 0 if halo else mask
    assert torch.equal(ref.dilate_mask(mask, halo), pooled)


@pytest.mark.parametrize("device,backend", MASK_CASES)
@pytest.mark.parametrize("halo", [0, 1, 3])
@pytest.mark.parametrize("name,mask", MASKS, ids=[n for n, _ in MASKS])
def test_mask_to_index_matches_the_reference(device, backend, name, mask, halo):
    mask = mask.to(device)
    if halo >= min(mask.shape[2:]):
        pytest.skip("halo larger than the image")
    want_index, want_count, want_table = ref.mask_to_index(mask, halo=halo, inverse=True)
    index, count, table = ops.mask_to_index(mask, halo=halo, inverse=True, backend=backend)
    assert count.dtype == torch.int64 and count.dim() == 0 and int(count) == int(want_count)
    if device == "cuda":  # an upper-bound buffer: the count first, then -1
        assert index.numel() == mask.numel()
        assert torch.equal(index[: int(count)], want_index) and bool((index[int(count) :] == -1).all())
    else:
        assert torch.equal(index, want_index)
    assert torch.equal(table, want_table)
    plain = ops.mask_to_index(mask, halo=halo, backend=backend)
    assert len(plain) == 2 and torch.equal(plain[0], index)


@pytest.mark.parametrize("device,backend", MASK_CASES)
def test_mask_to_index_capacity_pads_and_overflow_raises(device, backend):
    if device != "cpu":
        pytest.skip("the CPU semantics")
    mask = MASKS[2][1]
    exact, count = ops.mask_to_index(mask, backend=backend)
    padded, count2 = ops.mask_to_index(mask, capacity=exact.numel() + 5, backend=backend)
    assert int(count2) == int(count) and torch.equal(padded[: exact.numel()], exact)
    assert torch.equal(padded[exact.numel() :], torch.full((5,), -1))
    with pytest.raises(ValueError, match="capacity overflow"):
        ops.mask_to_index(mask, capacity=exact.numel() - 1, backend=backend)


def _images(layout, dtype=torch.float64):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 6, 7, generator=g, dtype=dtype)
    return x.contiguous(memory_format=layout)


LAYOUTS = [torch.contiguous_format, torch.channels_last]
LAYOUT_IDS = ["nchw", "nhwc"]


def _pixel_index(n: int, g: torch.Generator, pad: int = 3) -> torch.Tensor:
    """Increasing distinct pixels, then `pad` -1 entries (a capacity buffer's tail)."""
    picked = torch.sort(torch.randperm(n, generator=g)[: n // 3]).values
    return torch.cat([picked, torch.full((pad,), -1)])


@pytest.mark.parametrize("device,backend", GATHER_CASES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_gather_and_scatter_match_the_reference(device, backend, layout, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter (numpy) has no bfloat16: GPU only")
    g = torch.Generator().manual_seed(3)
    x = _images(layout, dtype).to(device)
    index = _pixel_index(x.shape[0] * x.shape[2] * x.shape[3], g).to(device)
    rows = ops.gather_pixels(x, index, backend=backend)
    assert torch.equal(rows, ref.gather_pixels(x, index))  # a copy: exact
    assert bool((rows[-3:] == 0).all())
    new_rows = torch.randn(rows.shape, generator=g).to(device, dtype)
    for mode in ("set", "add"):
        got = ops.scatter_pixels(new_rows, index, x, mode=mode, backend=backend)
        assert got.is_contiguous(memory_format=layout)
        assert torch.equal(got, ref.scatter_pixels(new_rows, index, x, mode=mode))
    assert torch.equal(x, _images(layout, dtype).to(device)), "scatter_pixels must not write its out argument"


@pytest.mark.parametrize("device,backend", SCATTER_CASES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_scatter_add_sums_repeated_pixels_in_row_order_and_set_refuses_them(device, backend, layout):
    out = _images(layout).to(device)
    index = torch.tensor([4, 9, 4, -1, 4, 0], device=device)
    rows = torch.arange(6 * 5, dtype=torch.float64, device=device).view(6, 5)
    got = ops.scatter_pixels(rows, index, out, mode="add", backend=backend)
    want = ref.scatter_pixels(rows, index, out, mode="add")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if backend == "cpp":
        with pytest.raises(ValueError, match="repeats"):
            ops.scatter_pixels(rows, index, out, mode="set", backend=backend)


@pytest.mark.parametrize("device,backend", GATHER_CASES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_gather_and_scatter_gradients_by_gradcheck(device, backend, layout):
    g = torch.Generator().manual_seed(4)
    x = _images(layout).to(device).requires_grad_()
    index = _pixel_index(x.shape[0] * x.shape[2] * x.shape[3], g, pad=2).to(device)
    rows = torch.randn(index.numel(), 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    fast = dict(fast_mode=backend == "triton")  # the interpreter runs each kernel call in Python
    assert torch.autograd.gradcheck(lambda a: ops.gather_pixels(a, index, backend=backend), (x,), **fast)
    for mode in ("set", "add"):
        assert torch.autograd.gradcheck(
            lambda r, o, m=mode: ops.scatter_pixels(r, index, o, mode=m, backend=backend), (rows, x), **fast
        )


def test_cpp_ops_pass_opcheck():
    if not any(c.values[1] == "cpp" for c in MASK_CASES):
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(2, 1, 6, 5, generator=g) < 0.4
    torch.library.opcheck(torch.ops.dynkernels.mask_to_index.default, (mask, 1, 64, True))
    x = torch.randn(2, 3, 6, 5, generator=g)
    index = torch.tensor([0, 7, 33, -1, 59])
    for xi in (x, x.to(memory_format=torch.channels_last), x.transpose(2, 3)):
        torch.library.opcheck(torch.ops.dynkernels.gather_pixels.default, (xi, index))
    rows = torch.randn(5, 3, generator=g, dtype=torch.float64)
    for mode in (0, 1):
        torch.library.opcheck(torch.ops.dynkernels.scatter_pixels.default, (rows, index, x.double(), mode))
        torch.library.opcheck(
            torch.ops.dynkernels.scatter_pixels.default,
            (rows, index, x.double().to(memory_format=torch.channels_last), mode),
        )


def test_sparse_path_compiles_fullgraph():
    """Compaction, gather, a per-row op, scatter back: one graph."""
    if not any(c.values[1] == "cpp" for c in MASK_CASES):
        pytest.skip("the C++ extension is not built")

    def block(x, mask, weight, depthwise, dense):  # a MobileNetV2 block's skeleton on the mask, then a 3x3
        in_index, _, inverse = ops.mask_to_index(mask, halo=1, inverse=True)
        out_index, _, out_inverse = ops.mask_to_index(mask, inverse=True)
        hidden = torch.relu(ops.gather_pixels(x, in_index) @ weight)
        y = ops.masked_depthwise_conv2d(hidden, inverse, out_index, depthwise, padding=1)
        y = ops.masked_conv2d(y, out_inverse, out_index, dense, padding=1)
        return ops.scatter_pixels(y, out_index, x, mode="add")

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 9, 8, generator=g)
    mask = torch.rand(2, 1, 9, 8, generator=g) < 0.2
    weight, depthwise = torch.randn(4, 4, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    dense = torch.randn(4, 4, 3, 3, generator=g)
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask, weight, depthwise, dense), block(x, mask, weight, depthwise, dense))


BAD_INPUTS = [
    ("mask-not-bool", lambda: ops.mask_to_index(torch.ones(1, 1, 4, 4)), TypeError, "mask must be a bool"),
    ("mask-shape", lambda: ops.mask_to_index(torch.ones(1, 2, 4, 4, dtype=torch.bool)), ValueError, r"\(B, 1, H, W\)"),
    (
        "halo-too-large",
        lambda: ops.mask_to_index(torch.ones(1, 1, 4, 6, dtype=torch.bool), halo=4),
        ValueError,
        "halo=4 is larger than the image",
    ),
    ("halo-negative", lambda: ops.mask_to_index(torch.ones(1, 1, 4, 4, dtype=torch.bool), halo=-1), ValueError, "halo"),
    (
        "index-range",
        lambda: ops.gather_pixels(torch.zeros(1, 2, 3, 3), torch.tensor([9])),
        IndexError,
        r"index must hold pixels in \[-1, B\*H\*W = 9\)",
    ),
    ("index-dtype", lambda: ops.gather_pixels(torch.zeros(1, 2, 3, 3), torch.tensor([1.0])), TypeError, "int64"),
    ("x-rank", lambda: ops.gather_pixels(torch.zeros(2, 3, 3), torch.tensor([1])), ValueError, r"x must be \(B, C"),
    (
        "rows-shape",
        lambda: ops.scatter_pixels(torch.zeros(2, 3), torch.tensor([1]), torch.zeros(1, 3, 3, 3)),
        ValueError,
        r"rows must be \(P, C\) = \(1, 3\)",
    ),
    (
        "rows-dtype",
        lambda: ops.scatter_pixels(torch.zeros(1, 3), torch.tensor([1]), torch.zeros(1, 3, 3, 3, dtype=torch.float64)),
        TypeError,
        "share a dtype",
    ),
    (
        "mode",
        lambda: ops.scatter_pixels(torch.zeros(1, 3), torch.tensor([1]), torch.zeros(1, 3, 3, 3), mode="max"),
        ValueError,
        "mode must be",
    ),
    (
        "masked-weight-shape",
        lambda: ops.masked_depthwise_conv2d(
            torch.zeros(4, 3), torch.full((1, 4, 4), -1), torch.tensor([0]), torch.zeros(3, 2, 3, 3)
        ),
        ValueError,
        r"weight must be \(C, 1, kh, kw\)",
    ),
    (
        "masked-out-index-range",
        lambda: ops.masked_depthwise_conv2d(
            torch.zeros(4, 3), torch.full((1, 4, 4), -1), torch.tensor([16]), torch.zeros(3, 1, 3, 3), padding=1
        ),
        IndexError,
        r"index must hold pixels in \[-1, B\*H\*W = 16\)",
    ),
    (
        "masked-inverse-range",
        lambda: ops.masked_depthwise_conv2d(
            torch.zeros(4, 3), torch.full((1, 4, 4), 4), torch.tensor([0]), torch.zeros(3, 1, 3, 3), padding=1
        ),
        IndexError,
        r"inverse_map must hold rows in \[-1, P_in = 4\)",
    ),
    (
        "masked-inverse-range-triton",
        lambda: ops.masked_conv2d(
            torch.zeros(4, 3),
            torch.full((1, 4, 4), 4),
            torch.tensor([0]),
            torch.zeros(3, 3, 3, 3),
            padding=1,
            backend="triton",
        ),
        IndexError,
        r"inverse_map must hold rows in \[-1, P_in = 4\)",
    ),
    (
        "masked-inverse-dtype",
        lambda: ops.masked_depthwise_conv2d(
            torch.zeros(4, 3), torch.full((1, 4, 4), -1.0), torch.tensor([0]), torch.zeros(3, 1, 3, 3)
        ),
        ValueError,
        "inverse_map must be a",
    ),
    (
        "masked-conv-weight-shape",
        lambda: ops.masked_conv2d(
            torch.zeros(4, 3), torch.full((1, 4, 4), -1), torch.tensor([0]), torch.zeros(5, 2, 3, 3)
        ),
        ValueError,
        r"weight must be \(Cout, Cin, kh, kw\) with Cin = 3",
    ),
    (
        "masked-conv-bias-shape",
        lambda: ops.masked_conv2d(
            torch.zeros(4, 3), torch.full((1, 4, 4), -1), torch.tensor([0]), torch.zeros(5, 3, 3, 3), torch.zeros(3)
        ),
        ValueError,
        r"bias must be \(Cout,\) = \(5,\)",
    ),
    (
        "masked-conv-dtype",
        lambda: ops.masked_conv2d(
            torch.zeros(4, 3), torch.full((1, 4, 4), -1), torch.tensor([0]), torch.zeros(5, 3, 3, 3).double()
        ),
        TypeError,
        "share a floating dtype",
    ),
    ("tau", lambda: ops.gumbel_gate(torch.zeros(3), tau=0.0), ValueError, "tau must be > 0"),
    ("logits-int", lambda: ops.gumbel_gate(torch.zeros(3, dtype=torch.int64)), TypeError, "floating"),
]


@pytest.mark.parametrize("call,error,match", bad_input_params(BAD_INPUTS))
def test_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)


# ---- DynConv's gate and loss against float64 transcriptions -------------------


def _gumbel_official(x, u1, u2, temp, noise, training, eps=1e-8):
    """maskunit.Gumbel.forward, transcribed (the uniforms passed in)."""
    if not training:
        return (x >= 0).to(x.dtype)
    if noise:
        g1 = -torch.log(-torch.log(u1 + eps) + eps)
        g2 = -torch.log(-torch.log(u2 + eps) + eps)
        x = x + g1 - g2
    soft = torch.sigmoid(x / temp)
    return ((soft >= 0.5).to(soft.dtype) - soft).detach() + soft


@pytest.mark.parametrize("noise", [True, False])
@pytest.mark.parametrize("tau", [1.0, 0.66])
def test_gumbel_gate_equals_dynconv_in_value_and_gradient(noise, tau):
    logits = torch.randn(2, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    gate = ops.gumbel_gate(logits, tau=tau, noise=noise, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    u1 = torch.rand(logits.shape, generator=g, dtype=torch.float64)
    u2 = torch.rand(logits.shape, generator=g, dtype=torch.float64)
    leaf = logits.detach().clone().requires_grad_()
    want = _gumbel_official(leaf, u1, u2, tau, noise, True)
    assert torch.equal(gate, want) and set(gate.unique().tolist()) <= {0.0, 1.0}
    weights = torch.randn(logits.shape, dtype=torch.float64)
    got_grad = torch.autograd.grad((gate * weights).sum(), logits)[0]
    want_grad = torch.autograd.grad((want * weights).sum(), leaf)[0]
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-13, atol=1e-15)
    assert got_grad.abs().sum() > 0  # the straight-through step passes the sigmoid's gradient
    assert torch.equal(ops.gumbel_gate(logits, training=False), (logits >= 0).double())


class _Mask:
    """dynconv Mask: active positions kept differentiable."""

    def __init__(self, hard, flops):
        self.active_positions = torch.sum(hard)
        self.total_positions = hard.numel()
        self.flops_per_position = flops


def _sparsity_official(masks, target, epoch, num_epochs):
    """loss.SparsityCriterion.forward, transcribed."""
    p = epoch / (0.33 * num_epochs)
    progress = math.cos(min(max(p, 0), 1) * (math.pi / 2)) ** 2
    upper_bound = 1 - progress * (1 - target)
    lower_bound = progress * target
    loss_block = torch.tensor(0.0, dtype=torch.float64)
    cost = torch.tensor(0.0, dtype=torch.float64)
    total = torch.tensor(0.0, dtype=torch.float64)
    for mask in masks:
        m_dil, m = mask["dilate"], mask["std"]
        c = m_dil.active_positions * m_dil.flops_per_position + m.active_positions * m.flops_per_position
        t = m_dil.total_positions * m_dil.flops_per_position + m.total_positions * m.flops_per_position
        layer_perc = c / t
        loss_block += max(0, layer_perc - upper_bound) ** 2
        loss_block += max(0, lower_bound - layer_perc) ** 2
        cost += c
        total += t
    perc = cost / total
    loss_block /= len(masks)
    return (perc - target) ** 2 + loss_block


@pytest.mark.parametrize("epoch", [0, 3, 9, 40])
def test_sparsity_loss_equals_dynconv(epoch):
    g = torch.Generator().manual_seed(epoch + 2)
    logits = [torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]
    flops = [(120.0, 40.0), (300.0, 0.0), (75.0, 75.0)]

    def hard_masks(leaves):
        hards = [_gumbel_official(x + 1.5 * i - 1.0, None, None, 1.0, False, True) for i, x in enumerate(leaves)]
        dil = [ref.dilate_mask(h.detach() > 0.5, 1).to(torch.float64) for h in hards]
        return hards, dil

    hards, dil = hard_masks(logits)
    got = ops.sparsity_loss(hards, dil, flops, target=0.3, epoch=epoch, num_epochs=30)
    leaves = [x.detach().clone().requires_grad_() for x in logits]
    h2, d2 = hard_masks(leaves)
    official = [{"std": _Mask(h, fs), "dilate": _Mask(d, fd)} for h, d, (fs, fd) in zip(h2, d2, flops, strict=True)]
    want = _sparsity_official(official, 0.3, epoch, 30)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    for a, b in zip(torch.autograd.grad(got, logits), torch.autograd.grad(want, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-16)


# ---- masked depthwise convolution ----------------------------------------------

MASKED_CASES = kernel_cases("masked_depthwise_conv2d")
MASKED_GEOMETRIES = [  # (k, stride, padding, dilation, H, W)
    (3, 1, 1, 1, 9, 8),
    (3, 2, 1, 1, 11, 10),  # stride 2: the output mask at half resolution
    (5, 1, 4, 2, 10, 9),
    (2, 1, 0, 1, 7, 6),
]


def _masked_inputs(geometry, density, halo, dtype=torch.float64, seed=0):
    k, s, p, d, h, w = geometry
    g = torch.Generator().manual_seed(seed + k * 10 + s)
    c = 6
    ho, wo = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    out_mask = torch.rand(2, 1, ho, wo, generator=g) < density
    in_mask = torch.rand(2, 1, h, w, generator=g) < density
    in_index, _, inverse = ref.mask_to_index(in_mask, halo=halo, inverse=True)
    out_index, _ = ref.mask_to_index(out_mask)
    out_index = torch.cat([out_index, torch.full((2,), -1)])  # a capacity buffer's tail
    rows = torch.randn(in_index.numel(), c, generator=g, dtype=dtype)
    weight = torch.randn(c, 1, k, k, generator=g, dtype=dtype)
    bias = torch.randn(c, generator=g, dtype=dtype)
    return rows, inverse, out_index, weight, bias, dict(stride=s, padding=p, dilation=d)


def _masked_conv_dw_official(rows, inverse, out_index, weight, stride, padding, dilation, out_hw):
    """DynConv's masked_conv kernel, transcribed (one output row, one channel at
    a time; the bias added after, as its block does with BN)."""
    b, h, w = inverse.shape
    oh, ow = out_hw
    kh, kw = weight.shape[2:]
    out = torch.zeros(out_index.numel(), rows.shape[1], dtype=rows.dtype)
    for i, tile in enumerate(out_index.tolist()):
        n, y, x = tile // (oh * ow), (tile // ow) % oh, tile % ow
        for c in range(rows.shape[1]):
            value = 0.0
            for ki in range(kh):
                for kj in range(kw):
                    h_in, w_in = -padding + y * stride + ki * dilation, -padding + x * stride + kj * dilation
                    if 0 <= h_in < h and 0 <= w_in < w:
                        value += float(weight[c, 0, ki, kj]) * float(rows[int(inverse[n, h_in, w_in]), c])
            out[i, c] = value
    return out


def test_masked_depthwise_reference_equals_dynconv_where_the_dilated_mask_covers_the_taps():
    k, s, p, d, h, w = 3, 1, 1, 1, 8, 7
    g = torch.Generator().manual_seed(12)
    mask = torch.rand(2, 1, h, w, generator=g) < 0.3
    in_index, _, inverse = ref.mask_to_index(mask, halo=1, inverse=True)  # DynConv's ExpandMask at stride 1
    out_index, _ = ref.mask_to_index(mask)
    rows = torch.randn(in_index.numel(), 4, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 1, k, k, generator=g, dtype=torch.float64)
    want = _masked_conv_dw_official(rows, inverse, out_index, weight, s, p, d, (h, w))
    got = ops.masked_depthwise_conv2d(rows, inverse, out_index, weight, stride=s, padding=p, dilation=d)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", MASKED_CASES)
@pytest.mark.parametrize("halo", [0, 2], ids=["taps-outside-the-mask", "dilated"])
@pytest.mark.parametrize("density", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("geometry", MASKED_GEOMETRIES, ids=lambda c: f"k{c[0]}-s{c[1]}-d{c[3]}")
def test_masked_depthwise_matches_the_reference(device, backend, geometry, density, halo):
    rows, inverse, out_index, weight, bias, geo = _masked_inputs(geometry, density, halo)
    for b in (None, bias):
        truth = ref.masked_depthwise_conv2d(rows, inverse, out_index, weight, b, **geo)
        got = ops.masked_depthwise_conv2d(rows, inverse, out_index, weight, b, **geo, backend=backend)
        torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12)
        assert bool((got[-2:] == 0).all())
    args32 = [t.float() for t in (rows, weight, bias)]
    assert_close_to_float64(
        ops.masked_depthwise_conv2d(args32[0], inverse, out_index, args32[1], args32[2], **geo, backend=backend),
        ref.masked_depthwise_conv2d(args32[0], inverse, out_index, args32[1], args32[2], **geo),
        truth,
    )


@pytest.mark.parametrize("device,backend", MASKED_CASES)
@pytest.mark.parametrize("geometry", MASKED_GEOMETRIES[:3], ids=lambda c: f"k{c[0]}-s{c[1]}-d{c[3]}")
def test_masked_depthwise_gradients_by_gradcheck(device, backend, geometry):
    rows, inverse, out_index, weight, bias, geo = _masked_inputs(geometry, 0.4, 1)
    leaves = [t.clone().requires_grad_() for t in (rows, weight, bias)]
    fn = lambda r, wt, bs: ops.masked_depthwise_conv2d(r, inverse, out_index, wt, bs, **geo, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=backend == "triton")


def test_cpp_masked_depthwise_opcheck_and_thread_independence():
    if not any(c.values[1] == "cpp" for c in MASKED_CASES):
        pytest.skip("the C++ extension is not built")
    rows, inverse, out_index, weight, bias, geo = _masked_inputs(MASKED_GEOMETRIES[1], 0.4, 1, torch.float32)
    op = torch.ops.dynkernels.masked_depthwise_conv2d
    geometry = ([2, 2], [1, 1], [1, 1])
    torch.library.opcheck(op.default, (rows, inverse, out_index, weight, bias, *geometry))
    torch.library.opcheck(op.default, (rows.double(), inverse, out_index, weight.double(), None, *geometry))
    big = _masked_inputs((3, 1, 1, 1, 40, 37), 0.5, 1, torch.float32, seed=3)
    runs, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            r, wt, bs = (t.clone().requires_grad_() for t in (big[0], big[3], big[4]))
            y = op(r, big[1], big[2], wt, bs, [1, 1], [1, 1], [1, 1])
            runs.append((y, *torch.autograd.grad(y.square().sum(), (r, wt, bs))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ---- masked dense convolution (the ResNet blocks' 3x3) ------------------------------

CONV_CASES = kernel_cases("masked_conv2d")


def _conv_inputs(geometry, density, halo, dtype=torch.float64, seed=0, cout=5):
    rows, inverse, out_index, _, _, geo = _masked_inputs(geometry, density, halo, dtype, seed)
    g = torch.Generator().manual_seed(seed + 99)
    k = geometry[0]
    weight = torch.randn(cout, rows.shape[1], k, k, generator=g, dtype=dtype)
    return rows, inverse, out_index, weight, torch.randn(cout, generator=g, dtype=dtype), geo


def _masked_conv_loops(rows, inverse, out_index, weight, bias, stride, padding, dilation):
    """The definition, one output row and tap at a time: a tap outside the
    image or on a pixel outside the input mask reads zero."""
    b, h, w = inverse.shape
    cout, _, kh, kw = weight.shape
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = torch.zeros(out_index.numel(), cout, dtype=rows.dtype)
    for r, pos in enumerate(out_index.tolist()):
        if pos < 0:
            continue
        n, y, x = pos // (oh * ow), pos // ow % oh, pos % ow
        out[r] = bias
        for i in range(kh):
            for j in range(kw):
                iy, ix = y * stride - padding + i * dilation, x * stride - padding + j * dilation
                if 0 <= iy < h and 0 <= ix < w and int(inverse[n, iy, ix]) >= 0:
                    out[r] += weight[:, :, i, j] @ rows[int(inverse[n, iy, ix])]
    return out


def test_masked_conv_reference_equals_the_loops():
    rows, inverse, out_index, weight, bias, geo = _conv_inputs(MASKED_GEOMETRIES[1], 0.5, 0)
    want = _masked_conv_loops(rows, inverse, out_index, weight, bias, **geo)
    torch.testing.assert_close(ref.masked_conv2d(rows, inverse, out_index, weight, bias, **geo), want)


@pytest.mark.parametrize("device,backend", CONV_CASES)
@pytest.mark.parametrize("halo", [0, 2], ids=["taps-outside-the-mask", "dilated"])
@pytest.mark.parametrize("density", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("geometry", MASKED_GEOMETRIES, ids=lambda c: f"k{c[0]}-s{c[1]}-d{c[3]}")
def test_masked_conv_matches_the_reference(device, backend, geometry, density, halo):
    rows, inverse, out_index, weight, bias, geo = _conv_inputs(geometry, density, halo)
    for b in (None, bias):
        truth = ref.masked_conv2d(rows, inverse, out_index, weight, b, **geo)
        got = ops.masked_conv2d(rows, inverse, out_index, weight, b, **geo, backend=backend)
        torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12)
        assert bool((got[-2:] == 0).all())  # the padding rows
    args32 = [t.float() for t in (rows, weight, bias)]
    assert_close_to_float64(
        ops.masked_conv2d(args32[0], inverse, out_index, args32[1], args32[2], **geo, backend=backend),
        ref.masked_conv2d(args32[0], inverse, out_index, args32[1], args32[2], **geo),
        truth,
    )


@pytest.mark.parametrize("device,backend", CONV_CASES)
def test_masked_conv_spans_several_row_blocks(device, backend):
    """More output rows than one block (the C++ kernel's blocks of up to 512 rows), a short tail."""
    rows, inverse, out_index, weight, bias, geo = _conv_inputs((3, 1, 1, 1, 40, 37), 0.6, 1, cout=3)
    truth = ref.masked_conv2d(rows, inverse, out_index, weight, bias, **geo)
    assert out_index.numel() > 1100
    got = ops.masked_conv2d(rows, inverse, out_index, weight, bias, **geo, backend=backend)
    torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", CONV_CASES)
@pytest.mark.parametrize("geometry", MASKED_GEOMETRIES[:3], ids=lambda c: f"k{c[0]}-s{c[1]}-d{c[3]}")
def test_masked_conv_gradients_by_gradcheck(device, backend, geometry):
    rows, inverse, out_index, weight, bias, geo = _conv_inputs(geometry, 0.4, 1, cout=3)
    leaves = [t.clone().requires_grad_() for t in (rows, weight, bias)]
    fn = lambda r, wt, bs: ops.masked_conv2d(r, inverse, out_index, wt, bs, **geo, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=backend == "triton")


def test_cpp_masked_conv_opcheck_and_thread_independence():
    if not any(c.values[1] == "cpp" for c in CONV_CASES):
        pytest.skip("the C++ extension is not built")
    rows, inverse, out_index, weight, bias, geo = _conv_inputs(MASKED_GEOMETRIES[1], 0.4, 1, torch.float32)
    op = torch.ops.dynkernels.masked_conv2d
    geometry = ([2, 2], [1, 1], [1, 1])
    torch.library.opcheck(op.default, (rows, inverse, out_index, weight, bias, *geometry))
    torch.library.opcheck(op.default, (rows.double(), inverse, out_index, weight.double(), None, *geometry))
    big = _conv_inputs((3, 1, 1, 1, 60, 57), 0.5, 1, torch.float32, seed=3, cout=8)  # 14 row blocks: 2 chunks
    runs, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            r, wt, bs = (t.clone().requires_grad_() for t in (big[0], big[3], big[4]))
            y = op(r, big[1], big[2], wt, bs, [1, 1], [1, 1], [1, 1])
            runs.append((y, *torch.autograd.grad(y.square().sum(), (r, wt, bs))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ---- modules ---------------------------------------------------------------------

from dynkernels import nn as dnn  # noqa: E402


def _block(channels=8, expand=3, head="conv1x1", mask_bias=None, seed=0):
    torch.manual_seed(seed)
    block = dnn.SparseInvertedResidual(channels, expand, head=head).double()
    with torch.no_grad():  # running statistics away from the defaults, so the folding is exercised
        for bn in (block.conv[1], block.conv[4], block.conv[7]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if mask_bias is not None:
            target = block.masker.maskconv if head == "conv1x1" else block.masker.maskconv.conv
            target.bias.fill_(mask_bias)
    return block


def _official_block_forward(block, x, hard):
    """The official InvertedResidual's sparse forward in training (fast=False):
    the dense conv sequence, then out = x + apply_mask(conv(x), mask)."""
    y = x
    for layer in block.conv:
        y = layer(y)
    return x + hard.expand_as(y) * y


@pytest.mark.parametrize("head", ["conv1x1", "squeeze"])
def test_sparse_block_trains_as_the_official_masked_dense_block(head):
    block = _block(head=head)
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    out, info = block(x, tau=0.8)
    torch.manual_seed(11)
    logits = block.masker.maskconv(x)
    u1, u2 = torch.rand_like(logits), torch.rand_like(logits)
    hard = _gumbel_official(logits, u1, u2, 0.8, True, True)
    want = _official_block_forward(block, x, hard)
    torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(info["mask"], hard, rtol=0, atol=0)
    assert torch.equal(info["dilated"], _expand_mask_official(hard.detach() > 0.5, 1))
    assert info["flops"] == (3 * 8 * 9 + 8 * 24, 24 * 8)
    grads = torch.autograd.grad(out.sum(), [p for p in block.masker.parameters()])
    assert all(g.abs().sum() > 0 for g in grads), "the straight-through gate must pass gradients to the mask unit"
    names = set(block.state_dict())
    assert {"conv.0.weight", "conv.1.running_var", "conv.3.weight", "conv.6.weight", "conv.7.bias"} <= names
    assert (
        {"masker.maskconv.weight", "masker.maskconv.bias"}
        if head == "conv1x1"
        else {"masker.maskconv.fc.weight", "masker.maskconv.conv.weight"}
    ) <= names


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("mask_bias", [None, -100.0, 100.0], ids=["some", "none", "all"])
@pytest.mark.parametrize("shape", [(2, 9, 7), (1, 5, 12)], ids=["b2-odd", "b1"])
def test_sparse_block_eval_equals_the_dense_masked_block(layout, mask_bias, shape):
    block = _block(mask_bias=mask_bias).eval()
    b, h, w = shape
    x = torch.randn(b, 8, h, w, dtype=torch.float64).contiguous(memory_format=layout)
    sparse, info = block(x)
    block.sparse = False
    dense, _ = block(x)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    inactive = ~(info["mask"] > 0.5).expand_as(x)
    assert torch.equal(sparse[inactive], x[inactive])
    if mask_bias == -100.0:
        assert torch.equal(sparse, x)
    assert sparse.is_contiguous(memory_format=layout)


# ---- layer skipping ------------------------------------------------------------


@pytest.mark.parametrize("capacity", [None, 3, 8], ids=["exact", "capacity-short", "capacity-padded"])
@pytest.mark.parametrize("keep", [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
def test_run_on_subset_equals_the_per_sample_loop(keep, capacity):
    g = torch.Generator().manual_seed(sum(keep))
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor(keep, dtype=torch.bool)
    fn = lambda t: torch.einsum("oc,nchw->nohw", weight, t).tanh() + t  # noqa: E731
    got = ops.run_on_subset(fn, x, keep, capacity=capacity)
    limit = keep.sum() if capacity is None else min(int(keep.sum()), capacity)
    ran = keep & (torch.cumsum(keep, 0) <= limit)  # past the capacity: passed through
    want = torch.stack([fn(x[i : i + 1])[0] if ran[i] else x[i] for i in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    gy = torch.randn(got.shape, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad(got, (x, weight), gy, allow_unused=True),
        torch.autograd.grad(want, (x, weight), gy, allow_unused=True),
        strict=True,
    ):
        if a is None or b is None:
            assert (a is None or not a.abs().sum()) and (b is None or not b.abs().sum())
        else:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_run_on_subset_checks_its_arguments():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"keep must be a \(B,\) bool"):
        ops.run_on_subset(lambda t: t, x, torch.ones(3))
    with pytest.raises(ValueError, match="fn must map"):
        ops.run_on_subset(lambda t: t[:, :1], x, torch.ones(3, dtype=torch.bool))


def test_gated_skip_blends_in_training_and_skips_in_eval():
    torch.manual_seed(2)
    block = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU()).double()
    skip = dnn.GatedSkip(block, 4).double()
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    torch.manual_seed(3)
    out, gate = skip(x)
    g = gate.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, g * block(x) + (1 - g) * x, rtol=0, atol=0)
    assert torch.autograd.grad(out.sum(), skip.gate.weight)[0].abs().sum() > 0
    skip.eval()
    with torch.no_grad():
        skip.gate.bias.fill_(0.0)
        skip.gate.weight.copy_(torch.linspace(-1, 1, 4).view(1, 4))
        out, gate = skip(x)
        on = gate > 0.5
        assert 0 < int(on.sum()) < 6
        torch.testing.assert_close(out[on], block(x[on]), rtol=1e-13, atol=1e-13)
        assert torch.equal(out[~on], x[~on])


# ---- SBNet tiles -----------------------------------------------------------------

REDUCE_CASES = kernel_cases("reduce_mask")
TILE_GEOMETRIES = [  # (block_size, block_stride, block_offset, block_count)
    ((5, 5), (3, 3), (-1, -1), None),  # 3x3 output tiles of a 3x3 conv: the halo overlaps
    ((4, 6), (4, 6), (0, 0), None),  # disjoint tiles, the last ones clipped
    ((7, 7), (5, 5), (-2, -1), (3, 4)),  # an explicit count, running past the image
    ((3, 3), (2, 2), (1, 0), None),  # a positive offset
]


@pytest.mark.parametrize("device,backend", REDUCE_CASES)
@pytest.mark.parametrize("mode,threshold", [("max", 0.5), ("max", -0.1), ("avg", 0.2), ("avg", 0.0)])
@pytest.mark.parametrize("geometry", TILE_GEOMETRIES, ids=["halo", "disjoint", "count", "offset"])
def test_reduce_mask_matches_sbnet(device, backend, mode, threshold, geometry):
    size, stride, offset, count = geometry
    g = torch.Generator().manual_seed(len(str(geometry)))
    for name, mask in (
        ("bool", torch.rand(2, 1, 13, 17, generator=g) < 0.1),
        ("float", torch.rand(2, 1, 13, 17, generator=g) * (torch.rand(2, 1, 13, 17, generator=g) < 0.2)),
        ("empty", torch.zeros(2, 1, 13, 17, dtype=torch.bool)),
    ):
        mask = mask.to(device)
        want, want_count = ref.reduce_mask(mask, size, stride, offset, count, threshold=threshold, mode=mode)
        got, got_count = ops.reduce_mask(
            mask, size, stride, block_offset=offset, block_count=count, threshold=threshold, mode=mode, backend=backend
        )
        assert int(got_count) == int(want_count), name
        assert torch.equal(got[: int(got_count)], want), name


@pytest.mark.parametrize("device,backend", REDUCE_CASES)
def test_reduce_mask_empty_block_quirk_and_capacity(device, backend):
    empty = torch.zeros(1, 1, 8, 8, dtype=torch.bool, device=device)
    got, count = ops.reduce_mask(empty, 4, 4, empty_block=True, backend=backend)
    assert int(count) == 1 and torch.equal(got[:1].cpu(), torch.zeros(1, 3, dtype=torch.int64))
    got, count = ops.reduce_mask(empty, 4, 4, backend=backend)
    assert int(count) == 0
    some = torch.zeros(1, 1, 8, 8, dtype=torch.bool, device=device)
    some[0, 0, 5, 1] = True
    got, count = ops.reduce_mask(some, 4, 4, capacity=3, backend=backend)
    assert int(count) == 1 and got.tolist() == [[0, 1, 0], [-1, -1, -1], [-1, -1, -1]]
    got, count = ops.reduce_mask(some, 4, 4, capacity=3, empty_block=True, backend=backend)
    assert int(count) == 1 and got.tolist()[0] == [0, 1, 0]
    with pytest.raises(ValueError, match="mode must be"):
        ops.reduce_mask(some, 4, 4, mode="sum", backend=backend)


TILE_CASES = kernel_cases("gather_tiles")


def _tiles(g):
    # (n, by, bx): interior, border and past-the-image tiles, and padding rows
    return torch.tensor([[0, 0, 0], [1, 2, 3], [0, 3, 0], [1, 0, 4], [-1, -1, -1], [0, 1, 2]])


@pytest.mark.parametrize("device,backend", TILE_CASES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_gather_and_scatter_tiles_match_sbnet(device, backend, layout):
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 3, 11, 13, generator=g, dtype=torch.float64).to(device).contiguous(memory_format=layout)
    tiles = _tiles(g).to(device)
    for size, stride, offset in (((5, 5), (3, 3), (-1, -1)), ((4, 3), (4, 3), (0, 0)), ((6, 4), (3, 2), (-2, 1))):
        got = ops.gather_tiles(x, tiles, size, stride, block_offset=offset, backend=backend)
        assert torch.equal(got, ref.gather_tiles(x, tiles, size, stride, offset))
        blocks = torch.randn(got.shape, generator=g, dtype=torch.float64).to(device)
        for mode in ("set", "add"):
            out = ops.scatter_tiles(blocks, tiles, x, stride, block_offset=offset, mode=mode, backend=backend)
            want = ref.scatter_tiles(blocks, tiles, x, stride, offset, mode=mode)
            if mode == "set" and stride[0] < size[0]:
                continue  # overlapping tiles: which one wins is undefined
            torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)
            assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("device,backend", TILE_CASES)
def test_tile_gradients_by_gradcheck(device, backend):
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 2, 7, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    tiles = torch.tensor([[0, 0, 0], [1, 1, 1], [-1, -1, -1], [0, 2, 1]], device=device)
    assert torch.autograd.gradcheck(
        lambda a: ops.gather_tiles(a, tiles, (4, 4), (3, 3), block_offset=(-1, -1), backend=backend), (x,)
    )
    blocks = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    for mode in ("set", "add"):
        assert torch.autograd.gradcheck(
            lambda bl, o, m=mode: ops.scatter_tiles(bl, tiles, o, (3, 3), mode=m, backend=backend), (blocks, x)
        )


def test_tile_path_of_a_3x3_conv_equals_the_dense_conv_on_the_active_tiles():
    """SBNet's pattern: reduce_mask with the conv's halo (block T + 2, stride T,
    offset -1), gather, a VALID 3x3 conv, scatter of the T x T outputs."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(2, 4, 14, 11, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 14, 11, generator=g) < 0.05
    t = 4
    tiles, count = ops.reduce_mask(mask, t + 2, t, block_offset=-1)
    blocks = F.conv2d(ops.gather_tiles(x, tiles, t + 2, t, block_offset=-1), weight)
    out = ops.scatter_tiles(blocks, tiles, torch.zeros(2, 5, 14, 11, dtype=torch.float64), t)
    dense = F.conv2d(x, weight, padding=1)
    covered = torch.zeros(2, 1, 14, 11, dtype=torch.bool)
    for n, by, bx in tiles.tolist():
        covered[n, :, by * t : by * t + t, bx * t : bx * t + t] = True
    assert int(count) > 0 and bool(covered[mask].all())  # every active pixel's tile is active
    torch.testing.assert_close(out * covered, dense * covered, rtol=1e-12, atol=1e-12)


def _randomize_bn(block):
    for bn in (m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


def _squeeze_official(head, x):
    """DynConv's Squeeze: the 3x3 conv to one channel plus the FC of the pooled input."""
    pooled = head.fc(F.adaptive_avg_pool2d(x, 1).view(x.shape[0], -1)).view(-1, 1, 1, 1)
    z = F.conv2d(x, head.conv.weight, head.conv.bias, head.conv.stride, 1)
    return z + pooled.expand_as(z)


def _basic(channels=4, tile=4, mask_bias=None, seed=0, path="pixels"):
    torch.manual_seed(seed)
    block = dnn.SparseBasicBlock(channels, tile=tile, path=path).double()
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if mask_bias is not None:
            block.masker.maskconv.conv.bias.fill_(mask_bias)
    return block


def test_sparse_basic_block_trains_as_the_official_block():
    block = _basic()
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    torch.manual_seed(5)
    out, info = block(x)
    torch.manual_seed(5)
    logits = _squeeze_official(block.masker.maskconv, x)
    u1, u2 = torch.rand_like(logits), torch.rand_like(logits)
    hard = _gumbel_official(logits, u1, u2, 1.0, True, True)
    y = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(out, torch.relu(x + hard * y), rtol=1e-13, atol=1e-13)
    assert {"conv1.weight", "bn1.running_mean", "conv2.weight", "bn2.bias", "masker.maskconv.conv.weight"} <= set(
        block.state_dict()
    )


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("mask_bias", [None, -100.0, 100.0], ids=["some", "none", "all"])
@pytest.mark.parametrize("shape,tile", [((2, 9, 7), 4), ((1, 13, 16), 8), ((2, 5, 6), 3)], ids=["odd", "b1", "t3"])
@pytest.mark.parametrize("path", ["pixels", "tiles"])
def test_sparse_basic_block_eval_equals_the_dense_masked_block(layout, mask_bias, shape, tile, path):
    block = _basic(tile=tile, mask_bias=mask_bias, path=path).eval()
    b, h, w = shape
    x = torch.randn(b, 4, h, w, dtype=torch.float64).contiguous(memory_format=layout)
    sparse, _ = block(x)
    block.sparse = False
    dense, _ = block(x)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_squeeze_head_equals_dynconv_in_value_and_gradient(layout, stride):
    unit = dnn.MaskUnit(5, stride, "squeeze").double()
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    head = unit.maskconv
    got = head(x)
    want = _squeeze_official(head, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, (x, head.conv.weight, head.fc.weight), g)
    wants = torch.autograd.grad(want, (x, head.conv.weight, head.fc.weight), g)
    for a, b in zip(grads, wants, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _bottleneck(planes=3, mask_bias=None, seed=0):
    torch.manual_seed(seed)
    block = dnn.SparseBottleneck(4 * planes, planes).double()
    with torch.no_grad():
        _randomize_bn(block)
        if mask_bias is not None:
            block.masker.maskconv.conv.bias.fill_(mask_bias)
    return block


def test_sparse_bottleneck_trains_as_the_official_block():
    block = _bottleneck()
    x = torch.randn(2, 12, 9, 7, dtype=torch.float64)
    torch.manual_seed(5)
    out, info = block(x)
    torch.manual_seed(5)
    logits = _squeeze_official(block.masker.maskconv, x)
    u1, u2 = torch.rand_like(logits), torch.rand_like(logits)
    hard = _gumbel_official(logits, u1, u2, 1.0, True, True)
    y = torch.relu(block.bn1(block.conv1(x)))
    y = block.bn3(block.conv3(torch.relu(block.bn2(block.conv2(y)))))
    torch.testing.assert_close(out, torch.relu(x + hard * y), rtol=1e-13, atol=1e-13)
    assert info["flops"] == (3 * 3 * 9 + 3 * 12, 12 * 3)
    assert {"conv3.weight", "bn3.running_var", "masker.maskconv.fc.weight"} <= set(block.state_dict())


def _bn_eval(bn, x):
    """BatchNorm2d in eval, from its definition."""
    shape = (1, -1, 1, 1)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("mask_bias", [None, -100.0, 100.0], ids=["some", "none", "all"])
@pytest.mark.parametrize("shape", [(2, 9, 7), (1, 5, 12)], ids=["b2-odd", "b1"])
def test_sparse_bottleneck_eval_equals_the_official_masked_block(layout, mask_bias, shape):
    """Against a float64 transcription of the official sparse forward in eval
    (dense convs, BN from its running statistics, the mask applied)."""
    block = _bottleneck(mask_bias=mask_bias).eval()
    b, h, w = shape
    x = torch.randn(b, 12, h, w, dtype=torch.float64).contiguous(memory_format=layout)
    out, info = block(x)
    hard = (_squeeze_official(block.masker.maskconv, x) >= 0).double()
    y = torch.relu(_bn_eval(block.bn1, F.conv2d(x, block.conv1.weight)))
    y = torch.relu(_bn_eval(block.bn2, F.conv2d(y, block.conv2.weight, padding=1)))
    y = _bn_eval(block.bn3, F.conv2d(y, block.conv3.weight))
    torch.testing.assert_close(out, torch.relu(x + hard * y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(info["mask"], hard)


def test_sparse_resnet_blocks_check_their_arguments():
    with pytest.raises(ValueError, match="inplanes must equal planes"):
        dnn.SparseBottleneck(16, 8)
    with pytest.raises(ValueError, match="path must be"):
        dnn.SparseBasicBlock(4, path="dense")
    with pytest.raises(ValueError, match=r"x must be \(B, 12, H, W\)"):
        _bottleneck().eval()(torch.zeros(1, 8, 4, 4, dtype=torch.float64))


@pytest.mark.triton
def test_triton_ops_pass_opcheck():
    if not any(c.values[1] == "triton" for c in CONV_CASES):
        pytest.skip("Triton is unavailable here")
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(2, 1, 6, 5, generator=g) < 0.4
    torch.library.opcheck(torch.ops.dynkernels.mask_to_index_triton.default, (mask, 1, 64, True))
    x = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 7, 33, -1, 59])
    rows = torch.randn(5, 3, generator=g, dtype=torch.float64)
    for xi in (x, x.to(memory_format=torch.channels_last)):
        torch.library.opcheck(torch.ops.dynkernels.gather_pixels_triton.default, (xi, index))
        torch.library.opcheck(torch.ops.dynkernels.scatter_pixels_triton.default, (rows, index, xi, 1))
    r, inverse, out_index, weight, bias, _ = _conv_inputs(MASKED_GEOMETRIES[1], 0.4, 1, cout=3)
    geometry = ([2, 2], [1, 1], [1, 1])
    torch.library.opcheck(
        torch.ops.dynkernels.masked_conv2d_triton.default, (r, inverse, out_index, weight, bias, *geometry)
    )
    dw = torch.randn(r.shape[1], 1, 3, 3, generator=g, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.dynkernels.masked_depthwise_conv2d_triton.default, (r, inverse, out_index, dw, None, *geometry)
    )


@pytest.mark.triton
@pytest.mark.parametrize("make", ["basic", "bottleneck", "inverted"])
def test_sparse_blocks_on_the_triton_backend_equal_the_dense_masked_block(make):
    if not any(c.values[1] == "triton" for c in CONV_CASES):
        pytest.skip("Triton is unavailable here")
    torch.manual_seed(2)
    if make == "basic":
        block, c = dnn.SparseBasicBlock(4, backend="triton").double(), 4
    elif make == "bottleneck":
        block, c = dnn.SparseBottleneck(8, 2, backend="triton").double(), 8
    else:
        block, c = dnn.SparseInvertedResidual(4, 3, backend="triton").double(), 4
    with torch.no_grad():
        _randomize_bn(block)
    block.eval()
    x = torch.randn(2, c, 7, 9, dtype=torch.float64)
    sparse, info = block(x)
    block.sparse = False
    dense, _ = block(x)
    assert 0 < float(info["mask"].mean()) < 1
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
