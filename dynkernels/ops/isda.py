"""ISDA (Wang et al., arXiv 2007.10538): the covariance estimator update and
the augmented cross-entropy, computed per class instead of per sample.

Work in progress (issue 5): these are the algorithms the kernels will
implement, in PyTorch, already without the official code's C-way expansions.
See :mod:`dynkernels.reference.isda` for the formulas.

* Estimator update: only classes present in the batch are touched; full
  covariance as one centred A x A product per present class (N A^2
  multiply-adds in all, not C N A^2); diagonal as segment sums.
* Loss: the quadratic term q_k[c] = (w_c - w_k)^T Sigma_k (w_c - w_k) is a
  (K_u, C) table over the K_u distinct labels, gathered per sample; the
  backward needs only the table's inputs and the softmax, never an N x C x A
  or N x A x A tensor.
"""

from __future__ import annotations

import torch

from ..reference.isda import _check_estimator

__all__ = ["isda_update", "isda_cross_entropy"]


def isda_update(
    features: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, mean: torch.Tensor, amount: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One estimator update (exact merge of population moments); returns new
    (cov, mean, amount). cov (C, A, A) full or (C, A) diagonal."""
    _check_estimator(features, labels, cov, mean, amount)
    x = features.detach().to(mean.dtype)
    cov, mean, amount = cov.clone(), mean.clone(), amount.clone()
    if x.shape[0] == 0:
        return cov, mean, amount
    present, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n_b = counts.to(mean.dtype)
    mu_b = torch.zeros(len(present), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    mu_b /= n_b[:, None]
    centred = x - mu_b[inverse]  # two-pass: centred before squaring (stable in fp32)
    w = n_b / (n_b + amount[present])
    delta = mean[present] - mu_b
    if cov.dim() == 3:
        order = torch.argsort(inverse, stable=True)
        blocks = torch.split(centred[order], counts.tolist())
        s_b = torch.stack([blk.T @ blk for blk in blocks]) / n_b[:, None, None]
        spread = delta[:, :, None] * delta[:, None, :]
        wv = w[:, None, None]
    else:
        s_b = torch.zeros_like(mu_b).index_add_(0, inverse, centred * centred) / n_b[:, None]
        spread = delta * delta
        wv = w[:, None]
    cov[present] = (1 - wv) * cov[present] + wv * s_b + wv * (1 - wv) * spread
    mean[present] = (1 - w[:, None]) * mean[present] + w[:, None] * mu_b
    amount[present] += n_b
    return cov, mean, amount


def _quad_table(weight: torch.Tensor, present: torch.Tensor, cov: torch.Tensor):
    """q[k, c] = (w_c - w_{p_k})^T Sigma_{p_k} (w_c - w_{p_k}) for the present labels
    p; also D Sigma (K, C, A) for the backward (full) or Sigma rows (diagonal)."""
    d = weight.unsqueeze(0) - weight[present].unsqueeze(1)  # (K, C, A)
    if cov.dim() == 3:
        sigma = cov[present].to(weight.dtype)
        # d^T S d = d^T sym(S) d, and sym(S) d is the gradient's direction for
        # any S, as autograd of the official form gives (equal to S d for a
        # covariance, which is symmetric).
        ds = torch.bmm(d, 0.5 * (sigma + sigma.transpose(1, 2)))  # (K, C, A)
    else:
        ds = d * cov[present].to(weight.dtype).unsqueeze(1)
    return (ds * d).sum(2), ds


class _ISDACrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, weight, labels, cov, lam):
        present, inverse = torch.unique(labels, return_inverse=True)
        q, ds = _quad_table(weight, present, cov.detach())
        aug = logits + (0.5 * lam) * q[inverse].to(logits.dtype)
        lse = torch.logsumexp(aug, dim=1)
        loss = (lse - aug.gather(1, labels[:, None]).squeeze(1)).mean()
        ctx.save_for_backward(aug, labels, present, inverse, ds)
        ctx.lam = lam
        return loss

    @staticmethod
    def backward(ctx, grad):
        aug, labels, present, inverse, ds = ctx.saved_tensors
        n = aug.shape[0]
        dz = torch.softmax(aug, dim=1)
        dz[torch.arange(n, device=aug.device), labels] -= 1
        dz *= grad / n
        # d/dW of (lam / 2) q_k[c]: lam Sigma_k (w_c - w_k) into row c, minus its sum over c into row k.
        g = torch.zeros(len(present), aug.shape[1], dtype=dz.dtype, device=dz.device).index_add_(0, inverse, dz)
        contrib = ctx.lam * g.unsqueeze(2).to(ds.dtype) * ds  # (K, C, A)
        d_weight = contrib.sum(0)
        d_weight.index_add_(0, present, -contrib.sum(1))
        return dz, d_weight, None, None, None


def isda_cross_entropy(
    logits: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, lam: float
) -> torch.Tensor:
    """Mean cross-entropy of the ISDA-augmented logits (Sigma detached, W not;
    the bias does not enter). logits (N, C), weight (C, A), labels (N,),
    cov (C, A, A) or (C, A). Gradients to logits and weight."""
    if logits.dim() != 2 or weight.dim() != 2 or logits.shape[1] != weight.shape[0]:
        raise ValueError(
            f"logits (N, C) and weight (C, A) must agree, got {tuple(logits.shape)}, {tuple(weight.shape)}"
        )
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be (N,) = ({logits.shape[0]},), got {tuple(labels.shape)}")
    classes = logits.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes})")
    if cov.shape not in ((classes, weight.shape[1], weight.shape[1]), (classes, weight.shape[1])):
        raise ValueError(
            f"cov must be (C, A, A) or (C, A) with C={classes}, A={weight.shape[1]}, got {tuple(cov.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError("isda_cross_entropy needs a non-empty batch")
    return _ISDACrossEntropy.apply(logits, weight, labels, cov, float(lam))
