"""Reference ISDA (Wang et al., "Regularizing Deep Networks with Semantic Data
Augmentation", arXiv 2007.10538) in plain PyTorch, two ways:

* ``*_official``: the formulation of the official code, written from its
  documented algorithm (../shared/papers/isda_metasemi_infopro_dcan.md, 1.1
  and 1.2): every per-class scalar expanded to C x A (x A), the covariance of
  the batch as a C-way masked batched matmul, a covariance gathered per
  sample, and an N x C x C product of which only the diagonal is kept. This
  is what users run today, and what the benchmarks compare against.
* the plain math, per class: the yardstick for the kernels.

The estimator (per class c: count n[c], mean mu[c] (A,), covariance
Sigma[c], full (A, A) or diagonal (A,)) merges each batch's population
moments exactly (Chan et al.): with the batch's n_b, mu_b, S_b for class c and
w = n_b / (n_b + n) (0 for classes absent from the batch),
    Sigma <- (1 - w) Sigma + w S_b + w (1 - w) (mu - mu_b)(mu - mu_b)^T
    mu    <- (1 - w) mu + w mu_b;   n <- n + n_b.
The augmented logits, for sample i of label y_i and class c:
    z~[i, c] = z[i, c] + (lambda / 2) (w_c - w_{y_i})^T Sigma_{y_i} (w_c - w_{y_i})
(diagonal: sum_a (W[c, a] - W[y_i, a])^2 Sigma_{y_i}[a]); Sigma is detached,
W is not, and the bias does not enter. The loss is the mean cross-entropy
of z~.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "isda_consistency_loss",
    "isda_logits",
    "isda_logits_official",
    "isda_logits_per_sample",
    "isda_loss",
    "isda_loss_official",
    "isda_loss_per_sample",
    "update_estimator",
    "update_estimator_official",
]


def check_estimator_shapes(features: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, mean, amount) -> None:
    """The estimator's shapes (shared with dynkernels.ops.isda_update_)."""
    if features.dim() != 2:
        raise ValueError(f"features must be (N, A), got {tuple(features.shape)}")
    if mean.dim() != 2:
        raise ValueError(f"mean must be (C, A), got {tuple(mean.shape)}")
    classes, dim = mean.shape
    if features.shape[1] != dim:
        raise ValueError(f"features have {features.shape[1]} channels, the estimator {dim}")
    if cov.shape not in ((classes, dim, dim), (classes, dim)):
        raise ValueError(f"cov must be (C, A, A) or (C, A) = ({classes}, {dim}), got {tuple(cov.shape)}")
    if amount.shape != (classes,):
        raise ValueError(f"amount must be (C,) = ({classes},), got {tuple(amount.shape)}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be (N,) = ({features.shape[0]},), got {tuple(labels.shape)}")


def _check_estimator(features: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, mean: torch.Tensor, amount):
    check_estimator_shapes(features, labels, cov, mean, amount)
    classes = mean.shape[0]
    if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got [{labels.min().item()}, {labels.max().item()}]")


def update_estimator(
    features: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, mean: torch.Tensor, amount: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One estimator update, per class present in the batch, centred two-pass
    moments. cov (C, A, A) is full, (C, A) diagonal. Returns new (cov, mean,
    amount); the inputs are not modified. features are treated as detached."""
    _check_estimator(features, labels, cov, mean, amount)
    features = features.detach().to(mean.dtype)
    cov, mean, amount = cov.clone(), mean.clone(), amount.clone()
    full = cov.dim() == 3
    for c in labels.unique().tolist():
        x = features[labels == c]
        n_b = x.shape[0]
        mu_b = x.mean(0)
        centred = x - mu_b
        s_b = centred.T @ centred / n_b if full else (centred * centred).sum(0) / n_b
        w = n_b / (n_b + amount[c])
        delta = mean[c] - mu_b
        spread = torch.outer(delta, delta) if full else delta * delta
        cov[c] = (1 - w) * cov[c] + w * s_b + w * (1 - w) * spread
        mean[c] = (1 - w) * mean[c] + w * mu_b
        amount[c] += n_b
    return cov, mean, amount


def update_estimator_official(
    features: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, mean: torch.Tensor, amount: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official formulation: the batch expanded to N x C x A under a
    one-hot mask, the class covariances as one (C, A, N) x (C, N, A) batched
    matmul, and the merge weight expanded to C x A x A (NaN from 0/0 set to 0
    for absent classes). Same results as :func:`update_estimator` up to
    rounding; C times the multiply-adds and memory."""
    _check_estimator(features, labels, cov, mean, amount)
    features = features.detach().to(mean.dtype)
    n, dim = features.shape
    classes = mean.shape[0]
    full = cov.dim() == 3
    onehot = F.one_hot(labels, classes).to(features.dtype)  # (N, C)
    mask = onehot.unsqueeze(-1).expand(n, classes, dim)  # (N, C, A)
    by_class = features.unsqueeze(1).expand(n, classes, dim) * mask
    count = mask.sum(0)  # (C, A)
    count = torch.where(count == 0, torch.ones_like(count), count)
    mu_b = by_class.sum(0) / count
    centred = by_class - mu_b.unsqueeze(0).expand(n, classes, dim) * mask
    if full:
        s_b = torch.bmm(centred.permute(1, 2, 0), centred.permute(1, 0, 2)) / count.unsqueeze(-1).expand(
            classes, dim, dim
        )
        batch_n = onehot.sum(0).view(classes, 1, 1).expand(classes, dim, dim)
        w = batch_n / (batch_n + amount.view(classes, 1, 1).expand(classes, dim, dim))
    else:
        s_b = (centred * centred).sum(0) / count
        batch_n = onehot.sum(0).view(classes, 1).expand(classes, dim)
        w = batch_n / (batch_n + amount.view(classes, 1).expand(classes, dim))
    w = torch.where(torch.isnan(w), torch.zeros_like(w), w)
    delta = mean - mu_b
    spread = torch.bmm(delta.unsqueeze(2), delta.unsqueeze(1)) if full else delta * delta
    new_cov = cov * (1 - w) + s_b * w + w * (1 - w) * spread
    w_mean = onehot.sum(0).view(classes, 1).expand(classes, dim)
    w_mean = w_mean / (w_mean + amount.view(classes, 1).expand(classes, dim))
    w_mean = torch.where(torch.isnan(w_mean), torch.zeros_like(w_mean), w_mean)
    new_mean = mean * (1 - w_mean) + mu_b * w_mean
    return new_cov, new_mean, amount + onehot.sum(0)


def isda_logits(
    logits: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, lam: float
) -> torch.Tensor:
    """The augmented logits z~ (N, C), computed once per distinct label (the
    quadratic term depends on a sample only through its label) and gathered.
    cov: per-class, full (C, A, A) or diagonal (C, A); detached. For
    per-sample variances see :func:`isda_logits_per_sample`."""
    cov = cov.detach()
    out = logits.clone()
    full = cov.dim() == 3
    for k in labels.unique().tolist():
        d = weight - weight[k]  # (C, A)
        quad = ((d @ cov[k]) * d).sum(1) if full else (d * d * cov[k]).sum(1)
        rows = labels == k
        out[rows] = logits[rows] + 0.5 * lam * quad.to(logits.dtype)
    return out


def isda_logits_per_sample(
    logits: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, variance: torch.Tensor, lam: float
) -> torch.Tensor:
    """LearnableISDA's form: a per-sample diagonal variance (N, A) (from a
    meta-network; not detached)."""
    d = weight.unsqueeze(0) - weight[labels].unsqueeze(1)  # (N, C, A)
    return logits + 0.5 * lam * (d * d * variance.unsqueeze(1)).sum(2)


def isda_logits_official(
    logits: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, lam: float
) -> torch.Tensor:
    """The official formulation: W expanded to N x C x A, the label rows
    gathered to N x C x A, Sigma gathered per sample (N x A x A), two batched
    matmuls to an N x C x C product whose diagonal is kept (diagonal
    covariance: the N x C x A square times the gathered variance)."""
    n, classes = logits.shape
    dim = weight.shape[1]
    cov = cov.detach()
    w_all = weight.expand(n, classes, dim)
    w_label = torch.gather(w_all, 1, labels.view(n, 1, 1).expand(n, classes, dim))
    diff = w_all - w_label
    if cov.dim() == 3:
        sigma = cov[labels]  # (N, A, A)
        quad = torch.bmm(torch.bmm(diff, sigma), diff.permute(0, 2, 1))
        quad = (quad * torch.eye(classes, dtype=quad.dtype, device=quad.device).expand(n, classes, classes)).sum(2)
    else:
        quad = (diff.pow(2) * cov[labels].unsqueeze(1).expand(n, classes, dim)).sum(2)
    return logits + 0.5 * lam * quad


def isda_loss(
    logits: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, lam: float
) -> torch.Tensor:
    """Mean cross-entropy of the augmented logits."""
    return F.cross_entropy(isda_logits(logits, weight, labels, cov, lam), labels)


def isda_loss_official(
    logits: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, lam: float
) -> torch.Tensor:
    return F.cross_entropy(isda_logits_official(logits, weight, labels, cov, lam), labels)


def isda_loss_per_sample(
    logits: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, variance: torch.Tensor, lam: float
) -> torch.Tensor:
    """Mean cross-entropy of the per-sample-variance augmented logits."""
    return F.cross_entropy(isda_logits_per_sample(logits, weight, labels, variance, lam), labels)


def isda_consistency_loss(
    logits: torch.Tensor, weight: torch.Tensor, cov: torch.Tensor, lam: float, *, detach_target: bool = True
) -> torch.Tensor:
    """Semi-supervised ISDA: an upper bound of the expected KL divergence between
    the prediction on a feature a and on its augmentation, for unlabeled samples.

    Derivation. Augment a ~ N(a, lam Sigma_y^) with y^ = argmax of the model's own
    prediction p = softmax(z), z = W a + b. Then z(a~) = z + W (a~ - a) and
        E KL(p || softmax(z(a~))) = sum_c p_c log p_c + sum_c p_c E[-log softmax(z(a~))_c],
        E[-log softmax(z(a~))_c] = E log sum_j exp(z_j(a~) - z_c(a~))
                                 <= log sum_j E exp(z_j(a~) - z_c(a~))        (Jensen)
                                 =  log sum_j exp(z_j - z_c + (lam / 2) Q[c, j])
    by the Gaussian moment-generating function, with
        Q[c, j] = (w_j - w_c)^T Sigma_y^ (w_j - w_c).
    So the bound is sum_c p_c (logsumexp_j(z_j + (lam / 2) Q[c, j]) - z_c) + sum_c p_c log p_c:
    ISDA's supervised bound with the label replaced by the soft prediction and
    the covariance of the predicted class. Averaged over the batch.

    detach_target: treat p (and y^) as a fixed target, as consistency training
    usually does; the entropy term is then a constant, kept so that the value
    bounds the KL itself. cov: (C, A, A) or (C, A); detached."""
    cov = cov.detach()
    probs = torch.softmax(logits, dim=1)
    target = probs.detach() if detach_target else probs
    predicted = logits.detach().argmax(1)
    total = logits.new_zeros(())
    for i in range(logits.shape[0]):
        k = int(predicted[i])
        d = weight.unsqueeze(0) - weight.unsqueeze(1)  # d[c, j] = w_j - w_c
        if cov.dim() == 3:
            q = torch.einsum("cja,ab,cjb->cj", d, cov[k].to(weight.dtype), d)
        else:
            q = (d * d * cov[k].to(weight.dtype)).sum(2)
        aug = logits[i].unsqueeze(0) + 0.5 * lam * q  # row c: the logits for "label" c
        ce = torch.logsumexp(aug, dim=1) - logits[i]
        entropy = (target[i] * torch.log(target[i].clamp_min(1e-30))).sum()
        total = total + (target[i] * ce).sum() + entropy
    return total / logits.shape[0]
