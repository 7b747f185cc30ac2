"""References of FDIT's frequency losses (issue 17; mu-cai/frequency-domain-
image-translation, ``utils_freq/freq_pixel_loss.py`` and
``freq_fourier_loss.py``), as the official code computes them.

* The Gaussian: OpenCV's ``getGaussianKernel(k, 0)`` (its fixed tables for
  k = 1, 3, 5, 7; else sigma = 0.3 ((k - 1) / 2 - 1) + 0.8, 3.5 at k = 21),
  in float64, the 2-D kernel its outer product, rounded once to the images'
  dtype (the official ``FloatTensor``).
* ``frequency_split``: zero padding by (k - 1) / 2, a direct k x k conv per
  channel (the official loop over ``x.split(1, 1)``); low = blur(RGB), high
  = gray - blur(gray) with gray = 0.299 R + 0.587 G + 0.114 B repeated to 3
  channels.
* ``frequency_pixel_loss``: w_low L1(low(fake), low(real)) + w_high
  L1(high(fake), high(real)) (means over all elements).
* ``spectral_loss``: the full 2-D FFT (no shift, no normalisation), the
  feature log(1 + sqrt(re^2 + im^2 + 1e-8)), the mean of |F(fake) M - F(real)
  M| over every element; "gray" takes the gray image first.
* ``circle_mask``: the official ``decide_circle``: 1 outside the disc of
  radius r around the array centre ((i - L/2 + 0.5)^2 + (j - L/2 + 0.5)^2 <
  r^2 is 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["circle_mask", "frequency_pixel_loss", "frequency_split", "gaussian_kernel_1d", "spectral_loss"]

# OpenCV's small-kernel tables (getGaussianKernel with sigma <= 0)
_CV_TABLES = {
    1: [1.0],
    3: [0.25, 0.5, 0.25],
    5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
    7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125],
}


def gaussian_kernel_1d(kernel_size: int, sigma: float | None = None) -> torch.Tensor:
    """OpenCV's getGaussianKernel(kernel_size, sigma or 0) in float64."""
    if (sigma is None or sigma <= 0) and kernel_size in _CV_TABLES:
        return torch.tensor(_CV_TABLES[kernel_size], dtype=torch.float64)
    if sigma is None or sigma <= 0:
        sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) * 0.5
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _gray(x):
    return x[:, 0] * 0.299 + x[:, 1] * 0.587 + x[:, 2] * 0.114


def _blur_per_channel(x, kernel2d):
    pad = (kernel2d.shape[-1] - 1) // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="constant", value=0)
    return torch.cat([F.conv2d(xx, kernel2d) for xx in x.split(1, 1)], 1)


def frequency_split(x: torch.Tensor, kernel_size: int = 21, sigma: float | None = None):
    g = gaussian_kernel_1d(kernel_size, sigma)
    kernel2d = torch.outer(g, g).to(x.dtype)[None, None]
    low = _blur_per_channel(x, kernel2d)
    gray = _gray(x).unsqueeze(1).repeat(1, 3, 1, 1)
    return low, gray - _blur_per_channel(gray, kernel2d)


def frequency_pixel_loss(fake, real, kernel_size: int = 21, sigma: float | None = None, weights=(1.0, 1.0)):
    low_f, high_f = frequency_split(fake, kernel_size, sigma)
    low_r, high_r = frequency_split(real, kernel_size, sigma)
    return weights[0] * F.l1_loss(low_f, low_r) + weights[1] * F.l1_loss(high_f, high_r)


def _log_amplitude(image):
    spectrum = torch.fft.fft2(image)
    return torch.log(1 + torch.sqrt(spectrum.real**2 + spectrum.imag**2 + 1e-8))


def spectral_loss(fake, real, mode: str = "color", mask=None):
    if mode == "gray":
        fake, real = _gray(fake), _gray(real)
    a, b = _log_amplitude(fake), _log_amplitude(real)
    if mask is not None:
        a, b = a * mask, b * mask
    return F.l1_loss(a, b)


def circle_mask(size: int, radius: float) -> torch.Tensor:
    mask = torch.ones(size, size)
    for i in range(size):
        for j in range(size):
            if (i - size / 2 + 0.5) ** 2 + (j - size / 2 + 0.5) ** 2 < radius**2:
                mask[i, j] = 0
    return mask
