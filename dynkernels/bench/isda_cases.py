"""Benchmark cases of ISDA: one training step's ISDA work (estimator update +
augmented loss forward + backward to the logits and the final layer's weight),
dynkernels against the official formulation, time and peak memory, at the
issue's sizes: CIFAR-100 / CIFAR-10 WRN-28-10 (N=128, A=640, full covariance),
ImageNet ResNet-50 (C=1000, A=2048, diagonal, N=64 and 256) and Cityscapes
segmentation (18818 pixels, C=19, A=512, diagonal)."""

from __future__ import annotations

import torch

from .. import ops
from ..reference import isda as ref
from .base import Case as _case
from .base import Impl as _impl

FAMILY = "isda"

# (name, N, C, A, covariance)
SIZES = (
    ("CIFAR-100 WRN-28-10", 128, 100, 640, "full"),
    ("CIFAR-10 WRN-28-10", 128, 10, 640, "full"),
    ("ImageNet ResNet-50", 64, 1000, 2048, "diagonal"),
    ("ImageNet ResNet-50", 256, 1000, 2048, "diagonal"),
    ("Cityscapes", 18818, 19, 512, "diagonal"),
)
QUICK = (("CIFAR-10 WRN-28-10", 64, 10, 64, "full"), ("ImageNet ResNet-50", 32, 100, 128, "diagonal"))
# The default run (4 GB in all) leaves out ImageNet at N=256 and Cityscapes,
# whose official formulations need ~10 GB and ~3.5 GB of tensors.
DEFAULT = tuple(size for size in SIZES if size[1] != 256 and size[0] != "Cityscapes")
LAMBDA = 0.5


def step_setup(n: int, classes: int, dim: int, covariance: str, device: str):
    g = torch.Generator().manual_seed(n + classes)
    features = torch.relu(torch.randn(n, dim, generator=g)).to(device)
    labels = torch.randint(0, classes, (n,), generator=g).to(device)
    weight = (0.05 * torch.randn(classes, dim, generator=g)).to(device).requires_grad_()
    logits = (features @ weight.detach().T).requires_grad_()
    # an estimator that has already seen a few batches
    shape = (classes, dim, dim) if covariance == "full" else (classes, dim)
    state = [
        torch.zeros(shape, device=device),
        torch.zeros(classes, dim, device=device),
        torch.zeros(classes, device=device),
    ]
    for _ in range(3):
        warm = torch.relu(torch.randn(n, dim, generator=g)).to(device)
        ops.isda_update_(warm, torch.randint(0, classes, (n,), generator=g).to(device), *state)

    running = [t.clone() for t in state]  # the criterion's buffers, updated in place each call

    def ours():  # as nn.ISDALoss runs it
        symmetric = ops.isda_update_(features, labels, *running)
        loss = ops.isda_cross_entropy(logits, weight, labels, running[0], LAMBDA, assume_symmetric=symmetric)
        return torch.autograd.grad(loss, (logits, weight))

    def official():
        cov, _, _ = ref.update_estimator_official(features, labels, *state)
        loss = ref.isda_loss_official(logits, weight, labels, cov, LAMBDA)
        return torch.autograd.grad(loss, (logits, weight))

    # agreement from the same state, before anything is timed
    check = [t.clone() for t in state]
    ops.isda_update_(features, labels, *check)
    got = torch.autograd.grad(ops.isda_cross_entropy(logits, weight, labels, check[0], LAMBDA), (logits, weight))
    for a, b in zip(got, official(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    return [
        _impl("dynkernels", ours, "kernel", True, measure_memory=True),
        _impl("official ISDA", official, "reference", True, measure_memory=True),
    ]


def _floors(n: int, classes: int, dim: int, covariance: str) -> dict:
    """The per-class formulation's work, with K the expected number of distinct
    labels among n uniform draws: full covariance, the update's A x A products
    over the batch (2 N A^2) and the loss's (K, C) table and its backward
    (4 K C A^2); diagonal, the table's GEMMs and their backward (8 K A C).
    Bytes: features, logits in and out, W and its gradient, and the present
    classes' covariance rows read and written."""
    k = classes * (1 - (1 - 1 / classes) ** n)
    if covariance == "full":
        flops, cov_bytes = 2 * n * dim * dim + 4 * k * classes * dim * dim, 2 * k * dim * dim * 4
    else:
        flops, cov_bytes = 8 * k * dim * classes, 2 * k * dim * 4
    return dict(floor_flops=flops, floor_bytes=n * dim * 4 + 2 * n * classes * 4 + 2 * classes * dim * 4 + cov_bytes)


def cases(size: str, device: str) -> list:
    sizes = {"quick": QUICK, "default": DEFAULT, "full": SIZES}[size]
    out = []
    for name, n, classes, dim, covariance in sizes:
        out.append(
            _case(
                "isda",
                f"isda step ({covariance})",
                f"{name} N={n} C={classes} A={dim}",
                lambda n=n, c=classes, a=dim, cov=covariance: step_setup(n, c, a, cov, device),
                dict(N=n, C=classes, A=dim, covariance=covariance, model=name),
                ("dynkernels", "official ISDA"),
                **_floors(n, classes, dim, covariance),
            )
        )
    return out
