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
import torch.distributed as dist

from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ..reference.isda import _check_estimator, update_estimator

__all__ = [
    "isda_consistency_loss",
    "isda_cross_entropy",
    "isda_cross_entropy_per_sample",
    "isda_update",
    "isda_update_",
]

FAMILY = "isda"
register_op("isda_update_", FAMILY, ("reference", "cpp", "cuda", "triton"), reference=update_estimator)


def isda_update(
    features: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, mean: torch.Tensor, amount: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One estimator update (exact merge of population moments); returns new
    (cov, mean, amount) and leaves the inputs alone. cov (C, A, A) full or
    (C, A) diagonal. :func:`isda_update_` updates in place."""
    cov, mean, amount = cov.clone(), mean.clone(), amount.clone()
    isda_update_(features, labels, cov, mean, amount)
    return cov, mean, amount


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's rows of x (any count per rank), concatenated in rank order."""
    world = dist.get_world_size(group)
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts, strict=True)])


def _native_update_ok(x, cov, mean, amount) -> bool:
    """The C++/CUDA full-covariance update (one fused, exactly symmetric merge
    pass per present class) takes contiguous float32/float64 buffers."""
    return (
        has_extension()
        and cov.dtype in (torch.float32, torch.float64)
        and all(t.dtype == cov.dtype for t in (x, mean, amount))
        and cov.is_contiguous()
        and mean.is_contiguous()
    )


def _merge_(cov, mean, amount, present, n_b, mu_b, s_b) -> None:
    """The exact merge of a batch's diagonal population moments (rows
    `present`) into the running ones."""
    w = n_b / (n_b + amount[present])
    delta = mean[present] - mu_b
    wv = w[:, None]
    cov[present] = (1 - wv) * cov[present] + wv * s_b + wv * (1 - wv) * delta * delta
    mean[present] = (1 - wv) * mean[present] + wv * mu_b
    amount[present] += n_b


@torch.no_grad()
def isda_update_(
    features: torch.Tensor,
    labels: torch.Tensor,
    cov: torch.Tensor,
    mean: torch.Tensor,
    amount: torch.Tensor,
    *,
    sync: bool = False,
    group=None,
    backend: str | None = None,
) -> bool:
    """In place: only the rows of classes present in the batch are read and
    written, one class at a time for the full covariance (no K x A x A gather).
    Returns True when the rows written are exactly symmetric (the C++ and
    Triton full-covariance paths, or a diagonal covariance), else False.
    backend: None (auto: "cpp" on CPU, "cuda" then "triton" on GPU), "cpp"
    (full: a BLAS product and one symmetric merge pass per present class;
    diagonal: per-class sums in row order, then the merge, over column blocks),
    "cuda" (full as cpp; the diagonal runs in PyTorch), "triton"
    (segment moments in row order, so deterministic on GPUs, and the tiled
    full-covariance merge; CPU under TRITON_INTERPRET=1) or "reference" (the
    same algorithm in PyTorch).

    sync=True (under torch.distributed) makes every rank's estimator see the
    global batch: the full covariance all-gathers the features and labels
    (N_global x A is small; C x A x A is not); the diagonal all-reduces the
    per-class counts and sums, then the centred squares (exact two-pass).
    Every rank then holds the estimator one process would hold after the
    concatenated batch (rank order)."""
    _check_estimator(features, labels, cov, mean, amount)
    x = features.detach().to(mean.dtype)
    syncing = sync and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    if syncing and cov.dim() == 3:
        x, labels = _all_gather_rows(x, group), _all_gather_rows(labels, group)
    elif syncing:
        classes = mean.shape[0]
        counts = torch.zeros(classes, dtype=x.dtype, device=x.device).index_add_(0, labels, torch.ones_like(x[:, 0]))
        sums = torch.zeros_like(mean).index_add_(0, labels, x)
        dist.all_reduce(counts, group=group)
        dist.all_reduce(sums, group=group)
        present = torch.nonzero(counts).squeeze(1)
        mu = sums / counts.clamp(min=1)[:, None]
        squares = torch.zeros_like(mean).index_add_(0, labels, (x - mu[labels]) ** 2)
        dist.all_reduce(squares, group=group)
        n_b = counts[present]
        _merge_(cov, mean, amount, present, n_b, mu[present], squares[present] / n_b[:, None])
        return True
    if x.shape[0] == 0:
        return True
    chosen = resolve("isda_update_", cov.device, backend)
    if chosen in ("cpp", "cuda") and cov.dim() == 3 and _native_update_ok(x, cov, mean, amount):
        torch.ops.dynkernels.isda_update_full_(cov, mean, amount, x, labels.long())
        return True
    if chosen == "cpp" and cov.dim() == 2 and _native_update_ok(x, cov, mean, amount) and amount.is_contiguous():
        torch.ops.dynkernels.isda_update_diagonal_(cov, mean, amount, x, labels.long())
        return True
    present, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n_b = counts.to(mean.dtype)
    order = torch.argsort(inverse, stable=True)
    if chosen == "triton":
        # segment sums in row order: deterministic (index_add would use atomics on GPUs)
        segments = torch.zeros(len(present) + 1, dtype=torch.int64, device=x.device)
        segments[1:] = torch.cumsum(counts, 0)
        x_sorted = x[order]
        mu_b, squares = family_kernels(FAMILY).segment_moments(x_sorted, segments, mean.dtype)
        if cov.dim() == 2:
            _merge_(cov, mean, amount, present, n_b, mu_b, squares / n_b[:, None])
            return True
        w = n_b / (n_b + amount[present])
        family_kernels(FAMILY).isda_update_full(
            cov, x_sorted - mu_b.repeat_interleave(counts, 0), segments, present, w, mean[present] - mu_b
        )
        mean[present] = (1 - w[:, None]) * mean[present] + w[:, None] * mu_b
        amount[present] += n_b
        return True
    mu_b = torch.zeros(len(present), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    mu_b /= n_b[:, None]
    centred = x - mu_b[inverse]  # two-pass: centred before squaring (stable in fp32)
    if cov.dim() == 2:
        s_b = torch.zeros_like(mu_b).index_add_(0, inverse, centred * centred) / n_b[:, None]
        _merge_(cov, mean, amount, present, n_b, mu_b, s_b)
        return True
    w = n_b / (n_b + amount[present])
    delta = mean[present] - mu_b
    blocks = torch.split(centred[order], counts.tolist())
    for k, c in enumerate(present.tolist()):
        wk = w[k].item()
        s_b = blocks[k].T @ blocks[k]
        cov[c].mul_(1 - wk).add_(s_b, alpha=wk / counts[k].item()).addr_(delta[k], delta[k], alpha=wk * (1 - wk))
    mean[present] = (1 - w[:, None]) * mean[present] + w[:, None] * mu_b
    amount[present] += n_b
    return False


def _quad_table_full(weight: torch.Tensor, present: torch.Tensor, cov: torch.Tensor, symmetric: bool):
    """q[k, c] = (w_c - w_{p_k})^T Sigma_{p_k} (w_c - w_{p_k}) for the present labels
    p, and D sym(Sigma) (K, C, A) for the backward (D Sigma when Sigma is
    known to be exactly symmetric)."""
    d = weight.unsqueeze(0) - weight[present].unsqueeze(1)  # (K, C, A)
    ds = torch.empty_like(d)
    for k, c in enumerate(present.tolist()):  # Sigma_c read in place: no K x A x A gather
        sigma = cov[c].to(weight.dtype)
        # d^T S d = d^T sym(S) d, and sym(S) d is the gradient's direction for
        # any S, as autograd of the official form gives (S d for a covariance).
        torch.matmul(d[k], sigma if symmetric else 0.5 * (sigma + sigma.T), out=ds[k])
    return (ds * d).sum(2), ds


def _quad_table_diagonal(weight: torch.Tensor, present: torch.Tensor, var: torch.Tensor):
    """The same for a diagonal Sigma, as three products (no K x C x A tensor):
    q = V (W∘W)^T - 2 (V∘W_P) W^T + rowsum(V∘W_P∘W_P), V = var[p], W_P = W[p].
    Expanding the square trades O(K C A) memory for cancellation: an absolute
    error of about eps |W|^2 |V|, so the caller centres W's rows first (the
    row differences, all that q depends on, do not change)."""
    v = var[present].to(weight.dtype)
    wp = weight[present]
    vwp = v * wp
    q = v @ (weight * weight).T - 2.0 * (vwp @ weight.T) + (vwp * wp).sum(1, keepdim=True)
    return q, v, wp


class _ISDACrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, weight, labels, cov, lam, symmetric):
        present, inverse = torch.unique(labels, return_inverse=True)
        cov = cov.detach()
        ctx.full = cov.dim() == 3
        if ctx.full:
            q, ds = _quad_table_full(weight, present, cov, symmetric)
            saved = (ds,)
        else:
            # q depends on W only through row differences: shifting every row by
            # the column mean changes nothing exactly, and removes a shared offset
            # from the expanded square's cancellation.
            weight = weight - weight.mean(0, keepdim=True)
            q, v, wp = _quad_table_diagonal(weight, present, cov)
            saved = (v, wp)
        aug = logits + (0.5 * lam) * q[inverse].to(logits.dtype)
        lse = torch.logsumexp(aug, dim=1)
        loss = (lse - aug.gather(1, labels[:, None]).squeeze(1)).mean()
        # Saved: the (K, C) table and the row log-sum-exps, not the (N, C)
        # augmented logits (rebuilt in the backward from the logits).
        ctx.save_for_backward(logits, q, lse, labels, present, inverse, weight, *saved)
        ctx.lam = lam
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, q, lse, labels, present, inverse, weight, *saved = ctx.saved_tensors
        n = logits.shape[0]
        aug = logits + (0.5 * ctx.lam) * q[inverse].to(logits.dtype)
        dz = torch.exp(aug - lse[:, None])
        dz[torch.arange(n, device=aug.device), labels] -= 1
        dz *= grad / n
        # gq = dL/dq: (lam / 2) times the logit gradients summed per label.
        gq = torch.zeros(len(present), aug.shape[1], dtype=dz.dtype, device=dz.device).index_add_(0, inverse, dz)
        gq = (0.5 * ctx.lam) * gq.to(weight.dtype)
        if ctx.full:
            # dq_k[c]/dw_c = 2 sym(S_k) d_kc; dq_k[c]/dw_k = -2 sym(S_k) d_kc.
            (ds,) = saved
            contrib = 2.0 * gq.unsqueeze(2) * ds  # (K, C, A)
            d_weight = contrib.sum(0)
            d_weight.index_add_(0, present, -contrib.sum(1))
        else:
            v, wp = saved
            d_weight = 2.0 * ((gq.T @ v) * weight - gq.T @ (v * wp))
            d_wp = -2.0 * (v * (gq @ weight) - gq.sum(1, keepdim=True) * (v * wp))
            d_weight.index_add_(0, present, d_wp)
        return dz, d_weight, None, None, None, None


def isda_cross_entropy(
    logits: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cov: torch.Tensor,
    lam: float,
    *,
    assume_symmetric: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of the ISDA-augmented logits (Sigma detached, W not;
    the bias does not enter). logits (N, C), weight (C, A), labels (N,),
    cov (C, A, A) or (C, A). Gradients to logits and weight, as autograd of
    the official form gives them for any Sigma. assume_symmetric=True skips
    symmetrising each full Sigma_k for the weight gradient: pass it only for
    an exactly symmetric Sigma (what :func:`isda_update_` reports)."""
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
    return _ISDACrossEntropy.apply(logits, weight, labels, cov, float(lam), bool(assume_symmetric))


if has_extension():

    @torch.library.register_fake("dynkernels::isda_update_full_")
    def _(cov, mean, amount, features, labels):
        return None

    @torch.library.register_fake("dynkernels::isda_update_diagonal_")
    def _(var, mean, amount, features, labels):
        return None


def isda_consistency_loss(
    logits: torch.Tensor, weight: torch.Tensor, cov: torch.Tensor, lam: float, *, detach_target: bool = True
) -> torch.Tensor:
    """Semi-supervised ISDA's consistency bound (derivation in
    :func:`dynkernels.reference.isda.isda_consistency_loss`), per predicted
    class: Q_k[c, j] = (w_j - w_c)^T Sigma_k (w_j - w_c) = s_jj + s_cc - 2 s_cj
    with S = W Sigma_k W^T (full) or (W∘v_k) W^T (diagonal), a C x C table per
    distinct predicted class instead of a (C, C, A) difference tensor per
    sample. W's rows are centred first (Q depends only on their differences),
    which keeps a shared offset out of the expansion's cancellation.
    Autograd gives the gradients (Sigma detached, W not)."""
    if logits.dim() != 2 or weight.dim() != 2 or logits.shape[1] != weight.shape[0]:
        raise ValueError(
            f"logits (N, C) and weight (C, A) must agree, got {tuple(logits.shape)}, {tuple(weight.shape)}"
        )
    cov = cov.detach()
    probs = torch.softmax(logits, dim=1)
    target = probs.detach() if detach_target else probs
    predicted = logits.detach().argmax(1)
    wc = weight - weight.mean(0, keepdim=True).detach()
    loss = logits.new_zeros(())
    for k in torch.unique(predicted).tolist():
        rows = predicted == k
        sigma = cov[k].to(weight.dtype)
        s = wc @ sigma @ wc.T if cov.dim() == 3 else (wc * sigma) @ wc.T
        diag = torch.diagonal(s)
        q = diag.unsqueeze(0) + diag.unsqueeze(1) - s - s.T  # q[c, j]; s + s^T keeps it exact for any Sigma
        aug = logits[rows].unsqueeze(1) + (0.5 * lam) * q.unsqueeze(0)  # (n_k, C "label" c, C j)
        ce = torch.logsumexp(aug, dim=2) - logits[rows]
        t = target[rows]
        loss = loss + (t * ce).sum() + (t * torch.log(t.clamp_min(1e-30))).sum()
    return loss / logits.shape[0]


def isda_cross_entropy_per_sample(
    logits: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, variance: torch.Tensor, lam: float
) -> torch.Tensor:
    """Mean cross-entropy of ISDA-augmented logits with a per-sample diagonal
    variance (N, A), as LearnableISDA feeds from a meta-network: differentiable
    in logits, weight and variance. The term as three GEMMs,
    q = v (W∘W)^T - 2 (v∘W_y) W^T + rowsum(v∘W_y∘W_y), O(N C A) work and
    O(N C) memory instead of an (N, C, A) difference tensor; W's rows are
    centred first (q depends only on their differences)."""
    if logits.dim() != 2 or weight.dim() != 2 or logits.shape[1] != weight.shape[0]:
        raise ValueError(
            f"logits (N, C) and weight (C, A) must agree, got {tuple(logits.shape)}, {tuple(weight.shape)}"
        )
    if variance.shape != (logits.shape[0], weight.shape[1]):
        raise ValueError(f"variance must be (N, A) = {(logits.shape[0], weight.shape[1])}, got {tuple(variance.shape)}")
    if labels.shape != (logits.shape[0],) or (labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1])):
        raise ValueError(f"labels must be (N,) in [0, {logits.shape[1]})")
    wc = weight - weight.mean(0, keepdim=True).detach()
    wy = wc[labels]
    vwy = variance * wy
    q = variance @ (wc * wc).T - 2.0 * (vwy @ wc.T) + (vwy * wy).sum(1, keepdim=True)
    return torch.nn.functional.cross_entropy(logits + (0.5 * lam) * q, labels)
