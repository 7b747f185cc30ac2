"""Benchmark cases of Auto Seg-Loss's surrogate losses (issue 17, part 2),
forward + backward (the gradient to the logits) with peak memory, side by
side, at the paper's training sizes: VOC 512 x 512, C = 21, batch 2, and
Cityscapes 512 x 1024, C = 19, batch 1, for every metric, against

* the official formulation (``dynkernels.reference.auto_seg_loss``, float32
  as the official code runs: the one-hot target, softmax, the curves' ~25
  elementwise launches, the sums; BIoU's and BF1's pools on C planes), and
* ``F.cross_entropy`` at the same size (the cost a user pays today per step).

Floor: the logits read twice (forward and the recomputing backward) and the
gradient written once, plus the labels read twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..reference import auto_seg_loss as ref
from .base import Case as _case
from .base import Impl as _impl

FAMILY = "auto_seg_loss"


def _problem(batch, classes, h, w, device):
    g = torch.Generator().manual_seed(batch * classes + h)
    logits = (torch.randn(batch, classes, h, w, generator=g) * 2).to(device).requires_grad_()
    coarse = torch.randint(0, classes, (batch, 1, h // 32, w // 32), generator=g).float()
    label = F.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()
    label[torch.rand(batch, h, w, generator=g) < 0.05] = 255
    return logits, label.to(device)


def _fwd_bwd(loss_fn, logits, label):
    def run():
        (grad,) = torch.autograd.grad(loss_fn(logits, label), logits)
        return grad

    return run


def loss_setup(metric, batch, classes, h, w, device):
    logits, label = _problem(batch, classes, h, w, device)
    preset = ops.SURROGATE_PRESETS[metric]
    theta = torch.tensor(preset["theta"])
    ours = _fwd_bwd(lambda z, t: ops.surrogate_seg_loss(z, t, metric=metric), logits, label)
    official = _fwd_bwd(
        lambda z, t: ref.surrogate_seg_loss(z, t, theta.to(z.device), metric, 255, preset["drop_bg"]), logits, label
    )
    got, want = ours(), official()
    # the official float32 formulation is the yardstick here (its float64 run would double the case's memory)
    scale = want.abs().max()
    if not bool((got - want).abs().max() <= 1e-4 * scale + 1e-9):
        raise AssertionError(f"surrogate_seg_loss ({metric}) disagrees with the official formulation; refusing to time it")
    ce = _fwd_bwd(lambda z, t: F.cross_entropy(z, t, ignore_index=255), logits, label)
    return [
        _impl("dynkernels", ours, "kernel", measure_memory=True),
        _impl("official formulation", official, "reference", True, measure_memory=True),
        _impl("F.cross_entropy", ce, "anchor", None, note="another loss: the cost of a step's loss today", measure_memory=True),
    ]


def cases(size: str, device: str) -> list:
    every = tuple(ops.SURROGATE_PRESETS)
    if size == "quick":
        shapes = [("tiny", 1, 5, 32, 32, every)]
    else:  # the default tier times Cityscapes for mIoU only (the official BF1 alone takes ~6 s a call)
        shapes = [("VOC", 2, 21, 512, 512, every), ("Cityscapes", 1, 19, 512, 1024, every if size == "full" else ("miou",))]
    out = []
    for name, b, c, h, w, metrics in shapes:
        for metric in metrics:
            elements = b * c * h * w
            out.append(
                _case(
                    FAMILY,
                    "surrogate_seg_loss fwd+bwd",
                    f"{metric} {name} B={b} C={c} {h}x{w}",
                    lambda a=(metric, b, c, h, w): loss_setup(*a, device),
                    dict(metric=metric, B=b, C=c, H=h, W=w),
                    ("dynkernels", "official formulation", "F.cross_entropy"),
                    floor_bytes=4 * elements * 3 + 8 * b * h * w * 2,
                )
            )
    return out
