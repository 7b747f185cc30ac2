"""Early exit, part 2: GFNet's focus patches, glance and the compaction ops.

The crop is held to a transcription of GFNet's ``utils.get_patch`` (a loop
over the batch reading each window back with .item(), the height used for
both axes) on square images, and to the reference (H for y, W for x) on
non-square ones; exact for every backend, channels-last kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_clear_error, bad_input_params, kernel_cases

from dynkernels import ops
from dynkernels.reference import early_exit as ref

CASES = kernel_cases("crop_patches")


def _official_get_patch(images, actions, patch_size):
    """GFNet's get_patch in our words: image_size = images.size(2) for both axes."""
    size = images.shape[2]
    corner = torch.floor(actions * (size - patch_size)).int()
    rows = []
    for i in range(images.shape[0]):
        y, x = corner[i, 0].item(), corner[i, 1].item()
        rows.append(images[i, :, y : y + patch_size, x : x + patch_size].unsqueeze(0))
    return torch.cat(rows, 0)


def _actions(b, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(b, 2, generator=g).to(dtype)
    if b >= 4:  # both ends of the range
        a[0] = 0.0
        a[1] = 1.0
        a[2, 0], a[2, 1] = 0.0, 1.0
    return a


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,c,s,p", [(6, 3, 32, 12), (1, 2, 9, 9), (5, 1, 17, 1)])
def test_crop_equals_the_official_loop_on_square_images(device, backend, dtype, b, c, s, p):
    images = torch.randn(b, c, s, s, dtype=dtype, device=device)
    actions = _actions(b, seed=b + s).to(device)
    out = ops.crop_patches(images, actions, p, backend=backend)
    assert out.shape == (b, c, p, p) and out.is_contiguous()
    assert torch.equal(out.cpu(), _official_get_patch(images.cpu(), actions.cpu(), p))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_crop_non_square_and_layouts(device, backend, layout):
    b, c, h, w, p = 5, 3, 21, 34, 8
    base = torch.randn(b, c, h, w + 3, device=device)
    images = {
        "contiguous": base[..., :w].contiguous(),
        "channels_last": base[..., :w].contiguous(memory_format=torch.channels_last),
        "strided": base[..., :w],
    }[layout]
    actions = _actions(b, seed=3).to(device)
    out = ops.crop_patches(images, actions, p, backend=backend)
    assert out.is_contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )
    # H for y, W for x, each crop read directly
    expected = torch.stack(
        [images[i, :, int(actions[i, 0] * (h - p)) :, int(actions[i, 1] * (w - p)) :][:, :p, :p] for i in range(b)]
    )
    assert torch.equal(out, expected)
    assert torch.equal(out, ref.crop_patches(images, actions, p))


def test_crop_floors_the_product_in_the_actions_dtype():
    """10k random float32 and float64 actions on a span (H - P = 130) whose
    products round: the window is floor of the product in the actions' own
    dtype, as the official float32 `action * (S - P)`."""
    s, p = 140, 10
    images = torch.arange(s * s, dtype=torch.float64).reshape(1, 1, s, s).expand(10000, 1, s, s).contiguous()
    for dtype in (torch.float32, torch.float64):
        actions = torch.rand(10000, 2, dtype=dtype)
        out = ops.crop_patches(images, actions, p)
        corner = out[:, 0, 0, 0].long()
        y, x = corner // s, corner % s
        assert torch.equal(y, torch.floor(actions[:, 0] * (s - p)).long())
        assert torch.equal(x, torch.floor(actions[:, 1] * (s - p)).long())


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] == "cpp"])
def test_crop_copies_any_dtype(device, backend):
    images = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)
    actions = _actions(4)
    assert torch.equal(ops.crop_patches(images, actions, 7, backend=backend), _official_get_patch(images, actions, 7))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_gradient(device, backend, channels_last):
    images = torch.randn(3, 2, 9, 11, dtype=torch.float64, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    images.requires_grad_()
    actions = torch.tensor([[0.0, 1.0], [0.5, 0.25], [1.0, 0.7]], dtype=torch.float64, device=device)
    fn = lambda x: ops.crop_patches(x, actions, 4, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (images,), fast_mode=backend == "triton")
    if backend != "triton":
        assert torch.autograd.gradgradcheck(fn, (images,))
    grad = torch.randn(3, 2, 4, 4, dtype=torch.float64, device=device)
    (ours,) = torch.autograd.grad(fn(images), images, grad)
    (theirs,) = torch.autograd.grad(ref.crop_patches(images, actions, 4), images, grad)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_from_an_index_equals_cropping_the_selected_images(device, backend, channels_last):
    images = torch.randn(6, 3, 20, 15, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    index = torch.tensor([5, 0, 0, 3], device=device)  # repeats allowed
    actions = _actions(4, seed=9).to(device)
    out = ops.crop_patches(images, actions, 6, index=index, backend=backend)
    assert torch.equal(out, ref.crop_patches(images[index], actions, 6))
    empty = ops.crop_patches(images, actions[:0], 6, index=index[:0], backend=backend)
    assert empty.shape == (0, 3, 6, 6)


def test_crop_empty_batch_and_full_size_patch():
    images = torch.randn(0, 3, 8, 8)
    assert ops.crop_patches(images, torch.rand(0, 2), 4).shape == (0, 3, 4, 4)
    images = torch.randn(2, 3, 8, 8)
    assert torch.equal(ops.crop_patches(images, torch.rand(2, 2), 8), images)


def test_cpp_crop_passes_opcheck_and_compiles():
    if not any(c.values[1] == "cpp" for c in CASES):
        pytest.skip("the C++ extension is not built")
    images = torch.randn(3, 2, 10, 12, requires_grad=True)
    actions = _actions(3)
    op = torch.ops.dynkernels.crop_patches.default
    torch.library.opcheck(op, (images, actions, None, 5))
    cl = images.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(op, (cl, actions, None, 5))
    torch.library.opcheck(op, (images.detach(), actions[:2], torch.tensor([2, 0]), 5))
    fn = lambda x, a: ops.crop_patches(x, a, 5).square().sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(images, actions), fn(images, actions))


@pytest.mark.triton
def test_triton_crop_passes_opcheck():
    if not any(c.values[1] == "triton" for c in CASES):
        pytest.skip("no Triton backend here")
    images = torch.randn(2, 2, 7, 9, requires_grad=True)
    op = torch.ops.dynkernels.crop_patches_triton.default
    torch.library.opcheck(op, (images, _actions(2), None, 4))
    torch.library.opcheck(op, (images.detach(), _actions(2)[:1], torch.tensor([1]), 4))


def test_actions_out_of_range_are_checked_or_clamped():
    images = torch.randn(2, 1, 10, 10)
    bad = torch.tensor([[0.5, 1.5], [float("nan"), 0.0]])
    with pytest.raises(ValueError, match="actions must lie in"):
        ops.crop_patches(images, bad, 4)
    out = ops.crop_patches(images, bad, 4, check_values=False)
    assert torch.equal(out[0], images[0, :, 3:7, 6:10])  # 1.5 clamped to the last window
    assert torch.equal(out[1], images[1, :, 0:4, 0:4])  # NaN to the first


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_glance_is_the_official_resize(mode):
    images = torch.randn(2, 3, 40, 30, dtype=torch.float64)
    expected = F.interpolate(images, size=[12, 12], mode=mode, align_corners=True)
    assert torch.equal(ops.glance(images, 12, mode=mode), expected)
    assert torch.equal(ref.glance(images, 12, mode), expected)
    assert ops.glance(images, (8, 6), mode=mode).shape == (2, 3, 8, 6)


def test_compact_and_expand_equal_the_reference():
    b = 7
    keep = torch.tensor([True, False, True, True, False, False, True])
    images = torch.randn(b, 3, 4, 4)
    hidden = torch.randn(1, b, 5)  # a GRU's hidden state: batch at dim 1
    index, kept_images, kept_hidden, nothing = ops.compact_active(keep, images, hidden, None, dims=(0, 1, 0))
    r_index, r_images, r_hidden, _ = ref.compact_active(keep, images, hidden, None, dims=(0, 1, 0))
    assert torch.equal(index, r_index) and index.tolist() == [0, 2, 3, 6]
    assert torch.equal(kept_images, r_images) and torch.equal(kept_hidden, r_hidden) and nothing is None
    out = torch.zeros(b, 5)
    values = torch.randn(4, 5)
    expected = ref.expand_results(out, index, values)
    assert torch.equal(ops.expand_results(out, index, values), expected)
    assert out.abs().sum() == 0  # out of place by default
    ops.expand_results(out, index, values, inplace=True)
    assert torch.equal(out, expected)
    # none kept, all kept
    index, kept = ops.compact_active(torch.zeros(b, dtype=torch.bool), images)
    assert index.numel() == 0 and kept.shape == (0, 3, 4, 4)
    index, kept = ops.compact_active(torch.ones(b, dtype=torch.bool), images)
    assert torch.equal(kept, images)


def test_compact_active_compiles_with_dynamic_output_shapes():
    def fn(keep, x, h):
        index, a, b = ops.compact_active(keep, x, h, dims=(0, 1))
        return index, a * 2, b + 1

    keep, x, h = torch.tensor([True, False, True, True]), torch.randn(4, 3), torch.randn(1, 4, 2)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(fn, fullgraph=True)(keep, x, h)
    for a, b in zip(compiled, fn(keep, x, h), strict=True):
        assert torch.equal(a, b)


def test_compaction_ops_compile():
    fn = lambda out, idx, v: ops.expand_results(out, idx, v) * 2  # noqa: E731
    out, idx, v = torch.zeros(6, 3), torch.tensor([4, 1]), torch.randn(2, 3)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(out, idx, v), fn(out, idx, v))
    g = lambda x: ops.glance(x, 8, mode="bilinear").sum()  # noqa: E731
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(torch.compile(g, fullgraph=True)(x), g(x))


_IMG = torch.randn(2, 3, 8, 8)
_ACT = torch.rand(2, 2)
BAD = [
    ("images not 4-D", lambda: ops.crop_patches(_IMG[0], _ACT, 4), ValueError, "images must be"),
    ("actions shape", lambda: ops.crop_patches(_IMG, _ACT[:1], 4), ValueError, "actions must be"),
    ("actions int", lambda: ops.crop_patches(_IMG, _ACT.long(), 4), ValueError, "actions must be"),
    ("patch too large", lambda: ops.crop_patches(_IMG, _ACT, 9), ValueError, "patch_size must be at most"),
    ("patch zero", lambda: ops.crop_patches(_IMG, _ACT, 0), ValueError, "patch_size"),
    ("index range", lambda: ops.crop_patches(_IMG, _ACT, 4, index=torch.tensor([0, 2])), IndexError, "index must lie"),
    (
        "index dtype",
        lambda: ops.crop_patches(_IMG, _ACT, 4, index=torch.tensor([0.0, 1.0])),
        ValueError,
        "index must be",
    ),
    ("index actions", lambda: ops.crop_patches(_IMG, _ACT, 4, index=torch.tensor([0])), ValueError, "actions must be"),
    (
        "index grad",
        lambda: ops.crop_patches(_IMG.clone().requires_grad_(), _ACT, 4, index=torch.tensor([0, 1])),
        ValueError,
        "no gradient",
    ),
    ("check value", lambda: ops.crop_patches(_IMG, _ACT, 4, check_values="yes"), ValueError, "check_values"),
    ("glance mode", lambda: ops.glance(_IMG, 4, mode="nearest"), ValueError, "mode must be"),
    ("glance size", lambda: ops.glance(_IMG, (4, 4, 4)), ValueError, "size must be"),
    ("keep dtype", lambda: ops.compact_active(torch.ones(2), _IMG), ValueError, "keep must be"),
    ("keep batch", lambda: ops.compact_active(torch.ones(3, dtype=torch.bool), _IMG), ValueError, "batch"),
    ("dims count", lambda: ops.compact_active(torch.ones(2, dtype=torch.bool), _IMG, dims=(0, 1)), ValueError, "dims"),
    ("expand index", lambda: ops.expand_results(_IMG, torch.tensor([5]), _IMG[:1]), IndexError, "index must lie"),
    ("expand shape", lambda: ops.expand_results(_IMG, torch.tensor([1]), _IMG), ValueError, "values must have"),
]


@pytest.mark.parametrize("call,error,match", bad_input_params(BAD))
def test_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)
