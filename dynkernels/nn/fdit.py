"""FDIT's losses as modules (issue 17, part 1).

* ``FrequencyPixelLoss(kernel_size=21, sigma=None, weights=(1, 1))``:
  w_low L1(low) + w_high L1(high) (:func:`dynkernels.ops.frequency_pixel_loss`).
* ``SpectralLoss(mode="color"|"gray", mask=None)``: the log-amplitude L1
  (:func:`dynkernels.ops.spectral_loss`); the mask is a buffer.
* ``FDITLoss(setup=..., image_size=256, kernel_size=21, radius=None)``: the
  frequency terms FDIT adds to each official setup, with its weights (all 1):
  - ``"swapping_autoencoder"``: ``forward(reconstruction, image, swap)`` =
    L1(low(rec), low(x)) + L1(high(rec), high(x)) + L1(high(swap), high(x))
    + spectral_color(rec, x) + spectral_gray(swap, x, mask_h), mask_h the
    official circle of radius = kernel size (21) on the image size
    (``kind="official"``, which keeps the low frequencies, see
    :func:`dynkernels.ops.circle_mask`; ``mask_kind="highpass"`` for the
    paper's reading). ``swap=None`` leaves its two terms out.
  - ``"stargan_v2"``: ``forward(reconstruction, image)`` = L1 over the six
    concatenated frequency channels, i.e. (L1(low) + L1(high)) / 2, +
    spectral_color(rec, x).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops

__all__ = ["FDITLoss", "FrequencyPixelLoss", "SpectralLoss"]


class FrequencyPixelLoss(nn.Module):
    def __init__(self, kernel_size: int = 21, sigma: float | None = None, weights=(1.0, 1.0)):
        super().__init__()
        ops.gaussian_kernel(kernel_size, sigma)  # validates
        self.kernel_size, self.sigma, self.weights = kernel_size, sigma, tuple(weights)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return ops.frequency_pixel_loss(
            fake, real, kernel_size=self.kernel_size, sigma=self.sigma, weights=self.weights
        )


class SpectralLoss(nn.Module):
    def __init__(self, mode: str = "color", mask: torch.Tensor | None = None):
        super().__init__()
        if mode not in ("color", "gray"):
            raise ValueError(f"mode must be 'color' or 'gray', got {mode!r}")
        self.mode = mode
        self.register_buffer("mask", mask)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return ops.spectral_loss(fake, real, mode=self.mode, mask=self.mask)


_SETUPS = ("swapping_autoencoder", "stargan_v2")


class FDITLoss(nn.Module):
    def __init__(
        self,
        setup: str = "swapping_autoencoder",
        *,
        image_size: int = 256,
        kernel_size: int = 21,
        sigma: float | None = None,
        radius: float | None = None,
        mask_kind: str = "official",
    ):
        super().__init__()
        if setup not in _SETUPS:
            raise ValueError(f"setup must be one of {_SETUPS}, got {setup!r}")
        self.setup = setup
        half = (0.5, 0.5) if setup == "stargan_v2" else (1.0, 1.0)
        self.pixel = FrequencyPixelLoss(kernel_size, sigma, half)
        self.high = FrequencyPixelLoss(kernel_size, sigma, (0.0, 1.0))
        self.spectral = SpectralLoss("color")
        mask = ops.circle_mask(image_size, kernel_size if radius is None else radius, kind=mask_kind)
        self.masked = SpectralLoss("gray", mask)

    def forward(self, reconstruction: torch.Tensor, image: torch.Tensor, swap: torch.Tensor | None = None):
        loss = self.pixel(reconstruction, image) + self.spectral(reconstruction, image)
        if self.setup == "swapping_autoencoder" and swap is not None:
            loss = loss + self.high(swap, image) + self.masked(swap, image)
        return loss
