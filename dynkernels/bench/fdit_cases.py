"""Benchmark cases of FDIT's frequency losses (issue 17, part 1), forward +
backward (the gradient to the fake image) with peak memory, side by side:

* ``frequency_pixel_loss`` (k = 21) at 256 x 256 batch 4 and 8 (and 1024 x
  1024 batch 1 in the full tier) against the official formulation (two
  ``find_fake_freq`` calls: per-channel 21 x 21 convs of both images, written
  from its code) and kornia's ``gaussian_blur2d`` (separable, constant
  border) on both images + L1. Floor: the two images read and the gradient
  written once (FLOPs: 2 x 21 x 2 MACs per pixel and channel, 4 channels,
  forward and backward, far under the copy time here... both are counted).
* ``spectral_loss`` (color, and gray with the official circle mask) at the
  same sizes against the official full ``fft2`` formulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..reference import fdit as ref
from .base import Case as _case
from .base import Impl as _impl
from .base import have

FAMILY = "fdit"


def _images(batch, size, device):
    g = torch.Generator().manual_seed(batch * size)
    fake = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device).requires_grad_()
    real = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    return fake, real


def _fwd_bwd(loss_fn, fake, real):
    def run():
        (grad,) = torch.autograd.grad(loss_fn(fake, real), fake)
        return grad

    return run


def _kornia_pixel(fake, real):
    from kornia.filters import gaussian_blur2d

    def split(x):
        gray = (x[:, 0] * 0.299 + x[:, 1] * 0.587 + x[:, 2] * 0.114).unsqueeze(1)
        blur = gaussian_blur2d(torch.cat([x, gray], 1), (21, 21), (3.5, 3.5), border_type="constant")
        return blur[:, :3], gray - blur[:, 3:]

    (lf, hf), (lr, hr) = split(fake), split(real)
    return F.l1_loss(lf, lr) + F.l1_loss(hf, hr)


def pixel_setup(batch, size, device):
    fake, real = _images(batch, size, device)
    ours = _fwd_bwd(lambda a, b: ops.frequency_pixel_loss(a, b), fake, real)
    official = _fwd_bwd(lambda a, b: ref.frequency_pixel_loss(a, b), fake, real)
    check = _fwd_bwd(lambda a, b: ref.frequency_pixel_loss(a.double(), b.double()), fake, real)()
    if (ours() - check).abs().max() > 1e-6 * check.abs().max():
        raise AssertionError(
            "frequency_pixel_loss's gradient disagrees with the official formulation; refusing to time it"
        )
    impls = [
        _impl("dynkernels", ours, "kernel", measure_memory=True),
        _impl("official (6 per-channel 21x21 convs x 2)", official, "reference", True, measure_memory=True),
    ]
    if have("kornia"):
        kornia = _fwd_bwd(_kornia_pixel, fake, real)
        agrees = bool((kornia() - check).abs().max() <= 1e-5 * check.abs().max())
        impls.append(_impl("kornia gaussian_blur2d + L1", kornia, "anchor", agrees, measure_memory=True))
    return impls


def spectral_setup(batch, size, masked, device):
    fake, real = _images(batch, size, device)
    mode, mask = ("gray", ops.circle_mask(size, 21).to(device)) if masked else ("color", None)
    ours = _fwd_bwd(lambda a, b: ops.spectral_loss(a, b, mode=mode, mask=mask), fake, real)
    official = _fwd_bwd(lambda a, b: ref.spectral_loss(a, b, mode, mask), fake, real)
    m64 = None if mask is None else mask.double()
    truth = _fwd_bwd(lambda a, b: ref.spectral_loss(a.double(), b.double(), mode, m64), fake, real)()
    # the two-times rule on the gradient: our error against float64 at most twice the official float32's
    if (ours() - truth).abs().max() > 2 * (official() - truth).abs().max() + 1e-12:
        raise AssertionError("spectral_loss's gradient disagrees with the official formulation; refusing to time it")
    return [
        _impl("dynkernels", ours, "kernel", measure_memory=True),
        _impl("official (full fft2)", official, "reference", True, measure_memory=True),
    ]


def cases(size: str, device: str) -> list:
    shapes = [(1, 32)] if size == "quick" else [(4, 256), (8, 256)] + ([(1, 1024)] if size == "full" else [])
    out = []
    for b, s in shapes:
        pixels = b * 3 * s * s
        out.append(
            _case(
                FAMILY,
                "frequency_pixel_loss fwd+bwd",
                f"B={b} 3x{s}x{s} k=21",
                lambda a=(b, s): pixel_setup(*a, device),
                dict(B=b, H=s, W=s, k=21),
                ("dynkernels", "official (6 per-channel 21x21 convs x 2)")
                + (("kornia gaussian_blur2d + L1",) if have("kornia") else ()),
                floor_bytes=4 * pixels * 3,  # fake and real read, the gradient written
            )
        )
        for masked in (False, True):
            out.append(
                _case(
                    FAMILY,
                    "spectral_loss fwd+bwd",
                    f"B={b} 3x{s}x{s} " + ("gray + circle mask" if masked else "color"),
                    lambda a=(b, s, masked): spectral_setup(*a, device),
                    dict(B=b, H=s, W=s, masked=masked),
                    ("dynkernels", "official (full fft2)"),
                    floor_bytes=4 * pixels * 3,
                )
            )
    return out
