"""FDIT's frequency losses (issue 17, part 1) against the official
formulation (dynkernels.reference.fdit transcribes freq_pixel_loss.py and
freq_fourier_loss.py): the OpenCV Gaussian, the split, the pixel loss fused
by linearity, the rfft2 spectral loss with Hermitian weights equal to the
full-spectrum loss for any mask, the official circle mask, the modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_clear_error, assert_close_to_float64, bad_input_params, kernel_cases

from dynkernels import nn as dnn
from dynkernels import ops
from dynkernels.reference import fdit as ref


def _images(n=2, h=37, w=30, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1).to(dtype) for _ in range(2))


def test_gaussian_is_opencvs():
    for k, table in ((1, [1.0]), (3, [0.25, 0.5, 0.25]), (5, [1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16])):
        assert ops.gaussian_kernel(k).tolist() == table
    g = ops.gaussian_kernel(21)
    x = torch.arange(21, dtype=torch.float64) - 10
    want = torch.exp(-(x**2) / (2 * 3.5**2))
    torch.testing.assert_close(g, want / want.sum(), rtol=1e-15, atol=0)
    try:
        import cv2
    except ImportError:
        return
    for k in (3, 5, 7, 9, 21, 31):
        torch.testing.assert_close(
            ops.gaussian_kernel(k), torch.from_numpy(cv2.getGaussianKernel(k, 0)[:, 0]), rtol=1e-14, atol=0
        )


@pytest.mark.parametrize("k", [1, 3, 7, 9, 21])
@pytest.mark.parametrize("size", [(37, 30), (8, 5)])  # odd sizes; an image smaller than the kernel
def test_split_equals_the_official_decomposition(k, size):
    x, _ = _images(h=size[0], w=size[1])
    low, high = ops.frequency_split(x, kernel_size=k)
    want_low, want_high = ref.frequency_split(x, k)
    torch.testing.assert_close(low, want_low, rtol=0, atol=1e-14)
    torch.testing.assert_close(high, want_high, rtol=0, atol=1e-14)
    x32 = x.float()
    low32, high32 = ops.frequency_split(x32, kernel_size=k)
    torch_low, torch_high = ref.frequency_split(x32, k)
    assert_close_to_float64(low32, torch_low, want_low)
    assert_close_to_float64(high32, torch_high, want_high)


PIXEL = kernel_cases("frequency_pixel_loss")


@pytest.mark.parametrize("device,backend", PIXEL)
@pytest.mark.parametrize("k,sigma", [(21, None), (7, None), (9, 2.0)])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("size", [(37, 30), (8, 5)])
def test_pixel_loss_equals_the_official_loss_and_gradients(device, backend, k, sigma, weights, size):
    fake, real = (t.to(device) for t in _images(h=size[0], w=size[1]))
    fake.requires_grad_()
    real.requires_grad_()
    ours = ops.frequency_pixel_loss(fake, real, kernel_size=k, sigma=sigma, weights=weights, backend=backend)
    want = ref.frequency_pixel_loss(fake, real, k, sigma, weights)
    torch.testing.assert_close(ours, want, rtol=1e-13, atol=0)
    g_ours = torch.autograd.grad(ours, (fake, real))
    g_want = torch.autograd.grad(want, (fake, real))
    for a, b in zip(g_ours, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-17)
    f32, r32 = fake.detach().float(), real.detach().float()
    assert_close_to_float64(
        ops.frequency_pixel_loss(f32, r32, kernel_size=k, sigma=sigma, weights=weights, backend=backend),
        ref.frequency_pixel_loss(f32, r32, k, sigma, weights),
        want.detach(),
    )
    f32.requires_grad_()
    loss32 = ops.frequency_pixel_loss(f32, r32, kernel_size=k, sigma=sigma, weights=weights, backend=backend)
    (g32,) = torch.autograd.grad(loss32, f32)
    (t32,) = torch.autograd.grad(ref.frequency_pixel_loss(f32, r32, k, sigma, weights), f32)
    assert_close_to_float64(g32, t32, g_want[0])


@pytest.mark.parametrize("device,backend", PIXEL)
def test_pixel_loss_gradcheck(device, backend):
    fake, real = (t.to(device) for t in _images(n=2, h=6, w=5))
    fake.requires_grad_()
    real.requires_grad_()
    fn = lambda a, b: ops.frequency_pixel_loss(a, b, kernel_size=5, weights=(0.7, 1.3), backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (fake, real))


def test_cpp_spectral_loss_passes_opcheck_and_compiles():
    if not any(c.values[1] == "cpp" for c in SPECTRAL):
        pytest.skip("the C++ extension is not built")
    fake, real = _images(dtype=torch.float32)
    a, b = torch.fft.rfft2(fake), torch.fft.rfft2(real)
    table = torch.rand(a.shape[-1])
    torch.library.opcheck(torch.ops.dynkernels.spectral_l1.default, (a, b, table, 100.0))
    sign = torch.ops.dynkernels.spectral_l1(a, b, table, 100.0)[1]
    torch.library.opcheck(
        torch.ops.dynkernels.spectral_l1_backward.default, (torch.tensor(1.0), a, sign, table, 100.0, -1.0)
    )
    fake.requires_grad_()
    fn = lambda x, y: ops.spectral_loss(x, y, backend="cpp") * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(fake, real), fn(fake, real))


def test_cpp_pixel_loss_passes_opcheck_and_compiles():
    if not any(c.values[1] == "cpp" for c in PIXEL):
        pytest.skip("the C++ extension is not built")
    fake, real = _images(dtype=torch.float32)
    fake.requires_grad_()
    kernel = ops.gaussian_kernel(7).float()
    torch.library.opcheck(torch.ops.dynkernels.frequency_pixel_loss.default, (fake, real, kernel, 1.0, 0.5))
    fn = lambda a, b: ops.frequency_pixel_loss(a, b, backend="cpp") * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(fake, real), fn(fake, real))


SPECTRAL = kernel_cases("spectral_loss")


@pytest.mark.parametrize("device,backend", SPECTRAL)
@pytest.mark.parametrize("size", [(32, 32), (37, 30), (16, 9)])
@pytest.mark.parametrize("mode", ["color", "gray"])
@pytest.mark.parametrize("mask", [None, "official", "random", "leading"])
def test_spectral_loss_equals_the_full_spectrum_loss(device, backend, size, mode, mask):
    fake, real = _images(h=size[0], w=size[1])
    fake.requires_grad_()
    h, w = size
    m = {
        None: None,
        "official": ref.circle_mask(max(size), 5)[:h, :w].double(),
        "random": torch.rand(2, 1, h, w).double(),
        "leading": torch.rand(2, 1, 1, h, w).double(),  # more leading dims than the images: broadcast samples
    }[mask]
    if mode == "gray" and mask in ("random", "leading"):
        m = m[:, 0]
    ours = ops.spectral_loss(fake, real, mode=mode, mask=m, backend=backend)
    want = ref.spectral_loss(fake, real, mode, m)
    torch.testing.assert_close(ours, want, rtol=1e-13, atol=0)
    (g_ours,) = torch.autograd.grad(ours, fake)
    (g_want,) = torch.autograd.grad(want, fake)
    torch.testing.assert_close(g_ours, g_want, rtol=1e-10, atol=1e-15)
    f32, r32 = fake.detach().float(), real.float()
    m32 = None if m is None else m.float()
    assert_close_to_float64(
        ops.spectral_loss(f32, r32, mode=mode, mask=m32, backend=backend),
        ref.spectral_loss(f32, r32, mode, m32),
        want.detach(),
    )
    f32.requires_grad_()
    (g32,) = torch.autograd.grad(ops.spectral_loss(f32, r32, mode=mode, mask=m32, backend=backend), f32)
    (t32,) = torch.autograd.grad(ref.spectral_loss(f32, r32, mode, m32), f32)
    assert_close_to_float64(g32, t32, g_want)


@pytest.mark.parametrize("device,backend", SPECTRAL)
def test_spectral_gradient_with_nearly_equal_spectra(device, backend):
    """Bins whose amplitudes nearly agree: the sign of the difference must be
    the exact one (the rounded log1p difference could flip it). The loss is
    scaled by its element count so that the gradients are O(1), well above
    the two-times rule's absolute floor."""
    base, _ = _images(n=2, h=64, w=48)
    fake, real = base.float(), (base * (1 + 1e-5 * torch.randn_like(base))).float()
    fake64 = fake.double().requires_grad_()  # the truth from the very float32 inputs
    scale = fake.numel()
    (truth,) = torch.autograd.grad(ref.spectral_loss(fake64, real.double()) * scale, fake64)
    fake.requires_grad_()
    (ours,) = torch.autograd.grad(ops.spectral_loss(fake, real, backend=backend) * scale, fake)
    (official,) = torch.autograd.grad(ref.spectral_loss(fake, real) * scale, fake)
    assert_close_to_float64(ours, official, truth)


@pytest.mark.parametrize("device,backend", SPECTRAL)
def test_spectral_loss_gradcheck(device, backend):
    fake, real = _images(n=1, h=6, w=5)
    fake.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ops.spectral_loss(a, real, backend=backend), (fake,))
    both = (fake, real.clone().requires_grad_())
    ones = torch.ones(6, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ops.spectral_loss(a, b, mask=ones, backend=backend), both)
    mask = torch.rand(6, 5, dtype=torch.float64)  # drawn once: the function must be deterministic
    assert torch.autograd.gradcheck(lambda a: ops.spectral_loss(a, real, mode="gray", mask=mask), (fake,))


def test_circle_masks():
    official = ops.circle_mask(32, 7)
    assert torch.equal(official, ref.circle_mask(32, 7))
    assert (
        official[0, 0] == 1 and official[16, 16] == 0
    )  # keeps DC, drops the centre (Nyquist) of an unshifted spectrum
    high = ops.circle_mask(32, 7, kind="highpass")
    assert torch.equal(high, torch.fft.ifftshift(official))
    assert high[0, 0] == 0 and high[16, 16] == 1


def test_reference_backend_is_the_official_formulation():
    fake, real = _images()
    assert torch.equal(ops.frequency_pixel_loss(fake, real, backend="reference"), ref.frequency_pixel_loss(fake, real))
    assert torch.equal(
        ops.spectral_loss(fake, real, mode="gray", backend="reference"), ref.spectral_loss(fake, real, "gray")
    )
    for a, b in zip(
        ops.frequency_split(fake, kernel_size=5, backend="reference"), ref.frequency_split(fake, 5), strict=True
    ):
        assert torch.equal(a, b)


def test_losses_compile():
    fake, real = _images(dtype=torch.float32)
    for fn in (
        lambda a, b: ops.frequency_pixel_loss(a, b),
        lambda a, b: ops.spectral_loss(a, b, mode="gray", mask=ops.circle_mask(37, 5)[:, :30]),
    ):
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(fake, real), fn(fake, real))


def test_fdit_loss_modules_follow_the_official_setups():
    rec, x = _images(h=32, w=32)
    swap, _ = _images(h=32, w=32, seed=1)
    sae = dnn.FDITLoss("swapping_autoencoder", image_size=32, kernel_size=7)
    low_r, high_r = ref.frequency_split(rec, 7)
    low_x, high_x = ref.frequency_split(x, 7)
    _, high_s = ref.frequency_split(swap, 7)
    mask_h = ref.circle_mask(32, 7).double()
    want = (
        F.l1_loss(low_r, low_x)
        + F.l1_loss(high_r, high_x)
        + F.l1_loss(high_s, high_x)
        + ref.spectral_loss(rec, x, "color")
        + ref.spectral_loss(swap, x, "gray", mask_h)
    )
    torch.testing.assert_close(sae(rec, x, swap), want, rtol=1e-13, atol=0)
    star = dnn.FDITLoss("stargan_v2", image_size=32, kernel_size=7)
    six = F.l1_loss(torch.cat([low_r, high_r], 1), torch.cat([low_x, high_x], 1))  # StarGAN v2's L1 over freq6
    torch.testing.assert_close(star(rec, x), six + ref.spectral_loss(rec, x, "color"), rtol=1e-13, atol=0)


_A, _B = _images(dtype=torch.float32)
BAD = [
    ("even kernel", lambda: ops.frequency_pixel_loss(_A, _B, kernel_size=4), ValueError, "odd"),
    ("sigma", lambda: ops.frequency_split(_A, sigma=-1.0), ValueError, "sigma"),
    ("channels", lambda: ops.frequency_split(_A[:, :2]), ValueError, "RGB"),
    ("shapes", lambda: ops.spectral_loss(_A, _B[:, :, :5]), ValueError, "one shape"),
    ("half", lambda: ops.spectral_loss(_A.half(), _B.half()), TypeError, "float32 or float64"),
    ("mode", lambda: ops.spectral_loss(_A, _B, mode="hsv"), ValueError, "mode"),
    ("mask", lambda: ops.spectral_loss(_A, _B, mask=torch.ones(3, 5)), ValueError, "mask"),
    ("weights", lambda: ops.frequency_pixel_loss(_A, _B, weights=(1.0,)), ValueError, "weights"),
    ("setup", lambda: dnn.FDITLoss("cyclegan"), ValueError, "setup"),
    ("circle kind", lambda: ops.circle_mask(8, 2, kind="lowpass"), ValueError, "kind"),
]


@pytest.mark.parametrize("call,error,match", bad_input_params(BAD))
def test_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)
