"""ISDA as a drop-in criterion (Wang et al., arXiv 2007.10538), over the ops
of :mod:`dynkernels.ops.isda`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._backends import check_module_backend, op_backend
from ..ops._validation import check_finite_real, check_int, check_tensor

__all__ = ["ISDAConsistencyLoss", "ISDALoss"]

_OPS = ("isda_update_", "isda_cross_entropy", "isda_consistency_loss")


class ISDALoss(nn.Module):
    """Implicit semantic data augmentation loss.

    ``forward(features, fc, targets, progress)`` updates the per-class feature
    estimator with the (detached) features, then returns the mean
    cross-entropy of the augmented logits with lambda = lambda0 * progress
    (the official schedule: progress = epoch / epochs, or iteration / steps in
    segmentation). ``fc`` is the final ``nn.Linear`` (or a 1x1 ``nn.Conv2d``),
    or a ``(weight, bias)`` pair.

    Segmentation: features (N, A, H, W) and targets (N, H, W) are flattened to
    pixels. With ``ignore_index`` set, ignored pixels enter the estimator as
    an extra class (row C of the buffers, as the official code keeps them)
    and are left out of the loss.

    Args:
        num_features: A, the feature dimension.
        num_classes: C.
        lambda0: the augmentation strength at progress 1 (CIFAR 0.5,
            ImageNet 7.5 in the paper).
        covariance: "full" (C, A, A) or "diagonal" (C, A).
        ignore_index: a target value to leave out of the loss (segmentation).
        sync: under torch.distributed, every rank's estimator sees the global
            batch (see :func:`dynkernels.ops.isda_update_`), so all ranks hold
            the same estimator. The official DDP code never synchronises: each
            rank estimates from its own shard and the ranks drift apart.
        backend: passed to the ops that have it (None: auto); see
            :func:`dynkernels.ops.isda_update_` and :func:`dynkernels.ops.isda_cross_entropy`.

    No step syncs with the host on GPUs beyond torch.unique's in the loss
    (ignored pixels are weighted out, not selected). The estimator lives in buffers (``covariance``, ``mean``, ``amount``), so
    it follows ``.to(device)`` and ``state_dict``.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        lambda0: float,
        *,
        covariance: str = "full",
        ignore_index: int | None = None,
        sync: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        num_features, num_classes = check_int("num_features", num_features, 1), check_int("num_classes", num_classes, 1)
        lambda0 = check_finite_real("lambda0", lambda0)
        if covariance not in ("full", "diagonal"):
            raise ValueError(f"covariance must be 'full' or 'diagonal', got {covariance!r}")
        if ignore_index is not None:
            ignore_index = check_int("ignore_index", ignore_index)
        check_module_backend(backend, *_OPS)
        self.num_features, self.num_classes, self.lambda0 = num_features, num_classes, lambda0
        self.covariance_kind, self.ignore_index, self.sync = covariance, ignore_index, sync
        self.backend = backend
        rows = num_classes + (1 if ignore_index is not None else 0)
        shape = (rows, num_features, num_features) if covariance == "full" else (rows, num_features)
        self.register_buffer("covariance", torch.zeros(shape))
        self.register_buffer("mean", torch.zeros(rows, num_features))
        self.register_buffer("amount", torch.zeros(rows))
        # Whether every row of the covariance is exactly symmetric (all updates so
        # far said so); lets the loss skip symmetrising it. Re-checked on load.
        self._symmetric = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        cov = self.covariance
        self._symmetric = cov.dim() == 2 or torch.equal(cov, cov.transpose(1, 2))

    @staticmethod
    def _weight_bias(fc):
        if isinstance(fc, tuple):
            weight, bias = fc
        else:
            weight, bias = fc.weight, fc.bias
        return weight.reshape(weight.shape[0], -1), bias

    def _check_fc(self, fc):
        """The final layer's (weight (C, A), bias) as the estimator expects them."""
        if isinstance(fc, tuple):
            if len(fc) != 2 or not isinstance(fc[0], torch.Tensor):
                raise TypeError("fc must be an nn.Linear, a 1x1 nn.Conv2d or a (weight, bias) pair of tensors")
        elif not isinstance(getattr(fc, "weight", None), torch.Tensor):
            raise TypeError(
                f"fc must be an nn.Linear, a 1x1 nn.Conv2d or a (weight, bias) pair, got {type(fc).__name__}"
            )
        weight, bias = self._weight_bias(fc)
        if weight.shape != (self.num_classes, self.num_features):
            raise ValueError(
                f"the final layer's weight must be ({self.num_classes}, {self.num_features}), got {tuple(weight.shape)}"
            )
        return weight, bias

    def _pixels(self, features) -> torch.Tensor:
        """features (N, A) or (N, A, H, W) -> (samples, A)."""
        check_tensor("features", features)
        if features.dim() == 4:  # segmentation: pixels as samples
            features = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"features must be (N, {self.num_features}) or (N, {self.num_features}, H, W), got {tuple(features.shape)}"
            )
        return features

    def forward(self, features: torch.Tensor, fc, targets: torch.Tensor, progress: float) -> torch.Tensor:
        """The loss of one step; the estimator is updated first. A
        segmentation batch whose every pixel is ignore_index is legal: the
        loss is 0, connected to the graph (zero gradients), and no class row
        of the estimator changes (the ignored pixels enter row C, as in the
        official code). N = 0 samples is a ValueError."""
        weight, bias = self._check_fc(fc)
        progress = check_finite_real("progress", progress)
        segmentation = isinstance(features, torch.Tensor) and features.dim() == 4
        features = self._pixels(features)
        check_tensor("targets", targets)
        if targets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"targets must be int32 or int64 class indices, got {targets.dtype}")
        if segmentation:  # (N, H, W) pixels, as the features
            targets = targets.reshape(-1)
        if targets.shape != (features.shape[0],):
            raise ValueError(
                f"targets must hold one class per sample ({features.shape[0]}), got {tuple(targets.shape)}"
            )
        estimator_targets = targets
        if self.ignore_index is not None:
            ignored = targets == self.ignore_index
            estimator_targets = torch.where(ignored, torch.full_like(targets, self.num_classes), targets)
        ops.isda_update_(
            features.detach(),
            estimator_targets,
            self.covariance,
            self.mean,
            self.amount,
            sync=self.sync,
            backend=op_backend(self.backend, "isda_update_"),
        )
        logits = F.linear(features, weight, bias)
        lam = self.lambda0 * progress
        return ops.isda_cross_entropy(
            logits,
            weight,
            targets,
            self.covariance[: self.num_classes],
            lam,
            assume_symmetric=self._symmetric,
            ignore_index=self.ignore_index,
            backend=op_backend(self.backend, "isda_cross_entropy"),
        )

    def extra_repr(self) -> str:
        return (
            f"features={self.num_features}, classes={self.num_classes}, lambda0={self.lambda0}, "
            f"covariance={self.covariance_kind!r}, ignore_index={self.ignore_index}, sync={self.sync}"
        )


class ISDAConsistencyLoss(nn.Module):
    """Semi-supervised ISDA: the consistency term for unlabeled samples, an
    upper bound of the expected KL divergence between the prediction on a
    feature and on its semantic augmentation, using the covariance of the
    class the model itself predicts (derivation:
    :func:`dynkernels.reference.isda.isda_consistency_loss`).

    ``forward(features, fc, progress)`` with lambda = lambda0 * progress. The
    covariance comes from ``estimator``, the :class:`ISDALoss` trained on the
    labeled samples (shared, not updated here). detach_target: the prediction
    on the original feature is the fixed target (the usual choice)."""

    def __init__(
        self, estimator: ISDALoss, lambda0: float, *, detach_target: bool = True, backend: str | None = None
    ) -> None:
        super().__init__()
        lambda0 = check_finite_real("lambda0", lambda0)
        check_module_backend(backend, *_OPS)
        if not isinstance(estimator, ISDALoss):
            raise TypeError(
                f"estimator must be the ISDALoss trained on the labeled samples, got {type(estimator).__name__}"
            )
        self.estimator, self.backend = estimator, backend
        self.lambda0, self.detach_target = float(lambda0), detach_target

    def forward(self, features: torch.Tensor, fc, progress: float) -> torch.Tensor:
        """The consistency term of unlabeled features (N, A) or (N, A, H, W);
        fc as the estimator's (C, A). N = 0 samples is a ValueError."""
        weight, bias = self.estimator._check_fc(fc)
        progress = check_finite_real("progress", progress)
        features = self.estimator._pixels(features)
        logits = F.linear(features, weight, bias)
        cov = self.estimator.covariance[: self.estimator.num_classes]
        return ops.isda_consistency_loss(
            logits,
            weight,
            cov,
            self.lambda0 * progress,
            detach_target=self.detach_target,
            backend=op_backend(self.backend, "isda_consistency_loss"),
        )
