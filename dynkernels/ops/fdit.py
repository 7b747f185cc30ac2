"""FDIT's frequency losses (issue 17, part 1; arXiv 2011.13611), as fast
compositions of torch ops held to the official formulation
(:mod:`dynkernels.reference.fdit`).

* ``frequency_split(x (N, 3, H, W), *, kernel_size=21, sigma=None) -> (low,
  high)``: FDIT's decomposition: the Gaussian of OpenCV's
  ``getGaussianKernel(k, 0)`` (its fixed tables for k <= 7; sigma 3.5 at k =
  21), zero padding, low = blur(RGB), high = gray - blur(gray) with gray =
  0.299 R + 0.587 G + 0.114 B. As one separable blur (2k instead of k^2
  multiply-adds per pixel) of the 4 channels R, G, B, gray; high is returned
  as the official 3 identical channels (an expanded view, no copy).
* ``frequency_pixel_loss(fake, real, *, kernel_size=21, sigma=None,
  weights=(1, 1)) -> ()``: w_low L1(low(fake), low(real)) + w_high
  L1(high(fake), high(real)). The blur is linear, so this is one separable
  blur of the difference d = fake - real on 4 channels, never of the two
  images apart (and more accurate: no cancellation between two blurred
  images).
* ``spectral_loss(fake, real, *, mode="color"|"gray", mask=None) -> ()``:
  the official L1 between log(1 + sqrt(|FFT|^2 + 1e-8)) (no shift, no
  normalisation, the mean over the full spectrum), through ``rfft2`` with
  Hermitian weights (each column but the self-conjugate ones counted twice;
  a mask enters as |M(u, v)| + |M(-u, -v)|), so it equals the full-spectrum
  loss exactly for any mask, at half the FFT work. log1p instead of log(1 +
  .) (the same value, rounded better).
* ``circle_mask(size, radius, *, kind="official"|"highpass") -> (size,
  size)``: "official" is ``decide_circle``'s first mask: 0 inside the disc
  around the *array centre*, which in an unshifted spectrum holds the highest
  frequencies, so it keeps DC and the low frequencies although the code
  names it the high-frequency mask; "highpass" moves that disc to DC
  (``ifftshift``), keeping the high frequencies as the paper describes.

Float32 and float64 (``torch.fft`` has no half on CPUs, as the official code
notes). Backends: "composite" (the above; auto for the split, and for the
losses on GPUs), "cpp" (auto on CPUs: the pixel loss in one fused pass
forward and one back, csrc/fdit/frequency_pixel_loss_cpu.cpp; the spectral
loss's elementwise part likewise around torch's FFTs,
csrc/fdit/spectral_l1_cpu.cpp), "reference" (the official formulation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from ..reference import fdit as ref
from ._registration import register_kernel_pairs
from ._validation import check_int, check_same_device, check_tensor

__all__ = ["circle_mask", "frequency_pixel_loss", "frequency_split", "gaussian_kernel", "spectral_loss"]

FAMILY = "fdit"
_BACKENDS = ("reference", "composite")
register_op("frequency_split", FAMILY, _BACKENDS, reference=ref.frequency_split, differentiable=_BACKENDS)
_KERNEL_BACKENDS = ("reference", "cpp", "composite")
for _name, _ref in (("frequency_pixel_loss", ref.frequency_pixel_loss), ("spectral_loss", ref.spectral_loss)):
    register_op(
        _name,
        FAMILY,
        _KERNEL_BACKENDS,
        reference=_ref,
        differentiable=_KERNEL_BACKENDS,
        auto={"cpu": ("cpp", "composite", "reference"), "cuda": ("composite", "reference")},
    )

_DTYPES = (torch.float32, torch.float64)
_GRAY = (0.299, 0.587, 0.114)


def gaussian_kernel(kernel_size: int = 21, sigma: float | None = None) -> torch.Tensor:
    """OpenCV's ``getGaussianKernel(kernel_size, sigma or 0)``, (k,) float64."""
    kernel_size = check_int("kernel_size", kernel_size, 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (the official zero padding is (k - 1) / 2), got {kernel_size}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0 or None (OpenCV's default for the size), got {sigma}")
    return ref.gaussian_kernel_1d(kernel_size, sigma)


def _check_images(**images) -> None:
    shape = None
    for name, t in images.items():
        check_tensor(name, t)
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"{name} must be (N, 3, H, W) RGB images, got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        if shape is not None and t.shape != shape:
            raise ValueError(f"fake and real must have one shape, got {tuple(shape)} and {tuple(t.shape)}")
        shape = t.shape
    check_same_device(**images)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0] * _GRAY[0] + x[:, 1] * _GRAY[1] + x[:, 2] * _GRAY[2]


def _blur4(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[R, G, B, gray] of x (N, 3, H, W) blurred by the separable Gaussian g: (N, 4, H, W)."""
    pad = (g.numel() - 1) // 2
    four = torch.cat([x, _gray(x).unsqueeze(1)], 1)
    g = g.to(x.dtype)
    horizontal = F.conv2d(four, g.view(1, 1, 1, -1).expand(4, 1, 1, -1), padding=(0, pad), groups=4)
    return four, F.conv2d(horizontal, g.view(1, 1, -1, 1).expand(4, 1, -1, 1), padding=(pad, 0), groups=4)


def frequency_split(x: torch.Tensor, *, kernel_size: int = 21, sigma: float | None = None, backend=None):
    """See the module docstring."""
    _check_images(x=x)
    gaussian_kernel(kernel_size, sigma)
    if resolve("frequency_split", x.device, backend) == "reference":
        return ref.frequency_split(x, kernel_size, sigma)
    four, blurred = _blur4(x, gaussian_kernel(kernel_size, sigma))
    high = (four[:, 3:] - blurred[:, 3:]).expand(-1, 3, -1, -1)
    return blurred[:, :3], high


def frequency_pixel_loss(
    fake: torch.Tensor,
    real: torch.Tensor,
    *,
    kernel_size: int = 21,
    sigma: float | None = None,
    weights=(1.0, 1.0),
    backend=None,
) -> torch.Tensor:
    """See the module docstring."""
    _check_images(fake=fake, real=real)
    if len(weights) != 2:
        raise ValueError(f"weights must be (w_low, w_high), got {weights}")
    g = gaussian_kernel(kernel_size, sigma)
    chosen = resolve("frequency_pixel_loss", fake.device, backend)
    if chosen == "reference":
        return ref.frequency_pixel_loss(fake, real, kernel_size, sigma, weights)
    if chosen == "cpp":
        return torch.ops.dynkernels.frequency_pixel_loss(
            fake, real, g.to(fake.dtype), float(weights[0]), float(weights[1])
        )
    four, blurred = _blur4(fake - real, gaussian_kernel(kernel_size, sigma))
    low = blurred[:, :3].abs().mean()
    high = (four[:, 3] - blurred[:, 3]).abs().mean()  # the three official copies have one mean
    return weights[0] * low + weights[1] * high


def _fake_pixel(fake, real, kernel, w_low, w_high):
    return fake.new_empty(())


def _fake_pixel_backward(grad, fake, real, kernel, w_low, w_high):
    return torch.empty_like(fake, memory_format=torch.contiguous_format)


def _pixel_setup(ctx, inputs, output):
    fake, real, kernel, w_low, w_high = inputs
    ctx.save_for_backward(fake, real, kernel)
    ctx.weights = (w_low, w_high)


def _pixel_backward(ctx, backward_op, grad):
    fake, real, kernel = ctx.saved_tensors
    need_fake, need_real = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_fake or need_real):
        return None, None, None, None, None
    g = backward_op(grad, fake, real, kernel, *ctx.weights)
    return (g if need_fake else None), (-g if need_real else None), None, None, None


register_kernel_pairs(
    [("dynkernels::frequency_pixel_loss", "dynkernels::frequency_pixel_loss_backward")] if has_extension() else [],
    fake=_fake_pixel,
    fake_backward=_fake_pixel_backward,
    setup_context=_pixel_setup,
    backward=_pixel_backward,
)

_MODES = ("color", "gray")


def _hermitian_weights(h: int, w: int, mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Per rfft2 bin, how much of the full spectrum it stands for."""
    half = w // 2 + 1
    twice = torch.ones(half, dtype=like.dtype, device=like.device)
    twice[1 : (w + 1) // 2] = 2  # columns v and W - v; v = 0 (and W / 2 for even W) are their own mirror
    if mask is None:
        return twice
    m = mask.to(like.dtype).abs()
    mirrored = torch.roll(m.flip(-2, -1), shifts=(1, 1), dims=(-2, -1))  # |M((-u) mod H, (-v) mod W)|
    single = twice == 1
    return m[..., :half] + torch.where(single, 0.0, 1.0) * mirrored[..., :half]


def spectral_loss(
    fake: torch.Tensor, real: torch.Tensor, *, mode: str = "color", mask: torch.Tensor | None = None, backend=None
):
    """See the module docstring."""
    _check_images(fake=fake, real=real)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mode == "gray":
        fake, real = _gray(fake), _gray(real)
    h, w = fake.shape[-2:]
    if mask is not None:
        mask = check_tensor("mask", mask)
        try:
            torch.broadcast_shapes(mask.shape, fake.shape)
        except RuntimeError:
            raise ValueError(
                f"mask {tuple(mask.shape)} does not broadcast to the spectrum {tuple(fake.shape)}"
            ) from None
        if mask.shape[-2:] != (h, w):
            raise ValueError(f"mask must end in the spectrum's (H, W) = {(h, w)}, got {tuple(mask.shape)}")
        check_same_device(fake=fake, mask=mask)
    chosen = resolve("spectral_loss", fake.device, backend)
    if chosen == "reference":
        return ref.spectral_loss(fake, real, "color", mask)  # fake and real already gray in "gray" mode
    weights = _hermitian_weights(h, w, mask, fake)
    spectrum_shape = torch.broadcast_shapes(fake.shape, () if mask is None else mask.shape)
    total = spectrum_shape.numel()
    if mask is not None and spectrum_shape != fake.shape:  # the mask's leading dims add samples: broadcast them
        fake, real = fake.expand(spectrum_shape), real.expand(spectrum_shape)
    if chosen == "cpp":
        return _SpectralL1Cpp.apply(fake, real, _period_table(weights, (*spectrum_shape[:-1], w // 2 + 1)), total)
    return _SpectralL1.apply(fake, real, weights, total)


def _period_table(weights: torch.Tensor, shape) -> torch.Tensor:
    """The weights as a contiguous table repeating over the spectrum's leading dims."""
    while weights.dim() > 1 and weights.shape[0] == 1:
        weights = weights[0]
    if tuple(weights.shape) != tuple(shape[len(shape) - weights.dim() :]):
        weights = weights.expand(shape)
    return weights.contiguous()


class _SpectralL1Cpp(torch.autograd.Function):
    """The same loss with its elementwise part in one C++ pass each way
    (csrc/fdit/spectral_l1_cpu.cpp); the sign of each bin's difference is kept
    as int8."""

    @staticmethod
    def forward(ctx, fake, real, table, total):
        a, b = torch.fft.rfft2(fake), torch.fft.rfft2(real)
        loss, sign = torch.ops.dynkernels.spectral_l1(a, b, table, float(total))
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(a if need_a else None, b if need_b else None, sign, table)
        ctx.total, ctx.size = float(total), fake.shape[-2:]
        return loss

    @staticmethod
    def backward(ctx, grad):
        a, b, sign, table = ctx.saved_tensors
        grads = []
        for spectrum, direction in ((a, 1.0), (b, -1.0)):
            if spectrum is None:
                grads.append(None)
                continue
            g = torch.ops.dynkernels.spectral_l1_backward(grad, spectrum, sign, table, ctx.total, direction)
            grads.append(_rfft2_adjoint_(g, ctx.size))
        return grads[0], grads[1], None, None


if has_extension():

    @torch.library.register_fake("dynkernels::spectral_l1")
    def _fake_spectral_l1(a, b, weights, total):
        return weights.new_empty(()), torch.empty(a.shape, dtype=torch.int8, device=a.device)

    @torch.library.register_fake("dynkernels::spectral_l1_backward")
    def _fake_spectral_l1_backward(grad, spectrum, sign, weights, total, direction):
        return torch.empty(spectrum.shape, dtype=spectrum.dtype, device=spectrum.device)


def _magnitude(spectrum: torch.Tensor) -> torch.Tensor:
    """sqrt(re^2 + im^2 + 1e-8), the official amplitude (one new tensor: large
    temporaries cost page faults here as much as the arithmetic)."""
    m = spectrum.real.square()
    return m.addcmul_(spectrum.imag, spectrum.imag).add_(1e-8).sqrt_()


def _rfft2_adjoint_(grad: torch.Tensor, size) -> torch.Tensor:
    """d L / d x for A = rfft2(x) real, from grad = dL/dRe A + i dL/dIm A (in
    place on grad): Re sum_{u, v half} grad e^{+i theta} = H W irfft2(grad with
    columns 1 .. ceil(W/2) - 1 halved), one inverse FFT (torch's rfft2 backward
    runs a full complex FFT on a zero-filled full spectrum)."""
    h, w = size
    grad[..., 1 : (w + 1) // 2] *= 0.5
    return torch.fft.irfft2(grad, s=(h, w)).mul_(h * w)


class _SpectralL1(torch.autograd.Function):
    """sum w |log1p(m(rfft2 a)) - log1p(m(rfft2 b))| / total, with a backward of
    one elementwise pass and one irfft2 per input that needs it."""

    @staticmethod
    def forward(ctx, fake, real, weights, total):
        a, b = torch.fft.rfft2(fake), torch.fft.rfft2(real)
        ma, mb = _magnitude(a), _magnitude(b)
        diff = torch.log1p(ma).sub_(torch.log1p(mb))
        signed = torch.sign(diff).mul_(weights)  # w sign(d): |d| w = d w sign(d)
        loss = torch.dot(diff.reshape(-1), signed.reshape(-1)) / total
        keep_b = ctx.needs_input_grad[1]  # the real image usually needs no gradient: keep nothing of it
        ctx.save_for_backward(a, b if keep_b else None, ma, mb if keep_b else None, signed)
        ctx.total, ctx.size = total, fake.shape[-2:]
        return loss

    @staticmethod
    def backward(ctx, grad):
        a, b, ma, mb, signed = ctx.saved_tensors
        grads = []
        for need, spectrum, m, sign in ((ctx.needs_input_grad[0], a, ma, 1.0), (ctx.needs_input_grad[1], b, mb, -1.0)):
            if not need:
                grads.append(None)
                continue
            # d |log1p(m)| / d(re, im) = sign (re, im) / (m (1 + m))
            factor = torch.div(signed * (grad * (sign / ctx.total)), m.add(1).mul_(m))
            grads.append(_rfft2_adjoint_(spectrum * factor, ctx.size))
        return grads[0], grads[1], None, None


_KINDS = ("official", "highpass")


def circle_mask(size: int, radius: float, *, kind: str = "official") -> torch.Tensor:
    """See the module docstring."""
    size = check_int("size", size, 1)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    c = torch.arange(size, dtype=torch.float64) - size / 2 + 0.5
    mask = ((c[:, None] ** 2 + c[None, :] ** 2) >= float(radius) ** 2).to(torch.float32)
    return mask if kind == "official" else torch.fft.ifftshift(mask)
