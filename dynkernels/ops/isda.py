"""ISDA (Wang et al., arXiv 2007.10538): the covariance estimator update and
the augmented cross-entropy, computed per class instead of per sample. The
formulas: :mod:`dynkernels.reference.isda`.

* Estimator update (:func:`isda_update_`): the batch rows sorted into one
  segment per class by the shared substrate (:mod:`dynkernels.ops.segment`);
  only classes present in the batch change; the full covariance costs one
  centred A x A product per present class (N A^2 multiply-adds in all, not
  C N A^2). Kernels: C++ (CPU), CUDA and Triton, none of which syncs with
  the host on GPUs.
* Losses: composites (PyTorch ops, no kernel of their own): the quadratic
  term q_k[c] = (w_c - w_k)^T Sigma_k (w_c - w_k) is a (K_u, C) table over the
  K_u distinct labels, gathered per sample; the backward needs only the
  table's inputs and the softmax, never an N x C x A or N x A x A tensor.
  The one host sync is torch.unique's (the number of distinct labels).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import reference
from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ..reference.isda import check_estimator_shapes
from ._validation import (
    check_finite_real,
    check_floating,
    check_int,
    check_no_self_overlap,
    check_same_device,
    check_tensor,
)
from .segment import gather_rows, scatter_add, segment_ids, segment_reduce, sort_segments

__all__ = [
    "isda_consistency_loss",
    "isda_cross_entropy",
    "isda_cross_entropy_per_sample",
    "isda_update",
    "isda_update_",
]

FAMILY = "isda"
_LOSSES = ("reference", "composite")
register_op("isda_update_", FAMILY, ("reference", "cpp", "cuda", "triton"), reference=reference.update_estimator)
register_op("isda_cross_entropy", FAMILY, _LOSSES, reference=reference.isda_loss, differentiable=_LOSSES)
register_op(
    "isda_cross_entropy_per_sample",
    FAMILY,
    _LOSSES,
    reference=reference.isda_loss_per_sample,
    differentiable=_LOSSES,
)
register_op("isda_consistency_loss", FAMILY, _LOSSES, reference=reference.isda_consistency_loss, differentiable=_LOSSES)

_INDEX_DTYPES = (torch.int32, torch.int64)
_KERNEL_DTYPES = (torch.float32, torch.float64)
# Memory for one chunk of gathered per-class covariances in the full loss
# (the table is built a chunk of classes at a time, never K x A x A at once).
_CHUNK_BYTES = 64 << 20


def _check_labels(labels: torch.Tensor, classes: int, check, amount: torch.Tensor | None = None) -> None:
    """The values a kernel cannot check for free: labels in [0, C) and, for
    the update, counts amount >= 0 (a negative one would give a NaN
    covariance). Per check: True: on CPU an eager ValueError (free); on GPUs
    a device-side assert (torch._assert_async: no host sync; like torch's own
    index kernels it fails at the next sync and leaves the CUDA context
    unusable). "sync": the eager ValueError on GPUs too (one host sync per
    call). False: no check; labels outside [0, C) are then dropped by the
    kernels (they belong to no class)."""
    if check is False or torch.compiler.is_compiling():
        return
    if check not in (True, "sync"):
        raise ValueError(f"check_labels must be True, 'sync' or False, got {check!r}")
    inside = ((labels >= 0) & (labels < classes)).all()
    counts_ok = (amount >= 0).all() if amount is not None else None
    if labels.device.type == "cuda" and check is True:
        valid = inside if counts_ok is None else inside & counts_ok
        torch._assert_async(valid, f"labels must lie in [0, {classes}) and amount must be >= 0")
        return
    if not bool(inside):
        low, high = int(labels.min()), int(labels.max())
        raise ValueError(f"labels must lie in [0, {classes}), got values in [{low}, {high}]")
    if counts_ok is not None and not bool(counts_ok):
        raise ValueError(f"amount (the per-class counts) must be >= 0, got a minimum of {float(amount.min())}")


def _check_update_args(features, labels, cov, mean, amount) -> None:
    for name, t in (("features", features), ("labels", labels), ("cov", cov), ("mean", mean), ("amount", amount)):
        check_tensor(name, t)
    check_same_device(features=features, labels=labels, cov=cov, mean=mean, amount=amount)
    if labels.dtype not in _INDEX_DTYPES:
        raise ValueError(f"labels must be int32 or int64 class indices, got {labels.dtype}")
    for name, t in (("features", features), ("cov", cov), ("mean", mean), ("amount", amount)):
        check_floating(name, t)
    check_estimator_shapes(features, labels, cov, mean, amount)
    for name, t in (("cov", cov), ("mean", mean), ("amount", amount)):
        check_no_self_overlap(name, t)


def isda_update(
    features: torch.Tensor, labels: torch.Tensor, cov: torch.Tensor, mean: torch.Tensor, amount: torch.Tensor, **kw
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One estimator update (exact merge of population moments); returns new
    (cov, mean, amount) and leaves the inputs alone. cov (C, A, A) full or
    (C, A) diagonal. Keywords as :func:`isda_update_`, which updates in place."""
    cov, mean, amount = cov.clone(), mean.clone(), amount.clone()
    isda_update_(features, labels, cov, mean, amount, **kw)
    return cov, mean, amount


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's rows of x (any count per rank), concatenated in rank order.
    The ranks' row counts are read on the host: sync=True's one host sync."""
    world = dist.get_world_size(group)
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = torch.cat(counts).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def _merge_diagonal_(cov, mean, amount, counts, mu_b, s_b) -> None:
    """The exact merge of a batch's diagonal population moments into the
    running ones, over every class; classes with count 0 are left unchanged
    (bit for bit: the merged value is not even computed into them)."""
    present = counts > 0
    w = torch.where(present, counts / (counts + amount), 0)[:, None]
    delta = mean - mu_b
    keep = present[:, None]
    cov.copy_(torch.where(keep, (1 - w) * cov + w * s_b + w * (1 - w) * delta * delta, cov))
    mean.copy_(torch.where(keep, (1 - w) * mean + w * mu_b, mean))
    amount.add_(counts)


def _update_on_segments(chosen: str, x, labels, cov, mean, amount) -> None:
    """The GPU update without a host sync: rows sorted into one segment per
    class (all C of them; absent classes have empty segments), moments by the
    shared segment reduction (row order: deterministic), then the merge --
    for a full covariance the Triton kernel's, one program per (class, tile pair)."""
    classes = mean.shape[0]
    segments = sort_segments(labels, classes)
    rows = x.index_select(0, segments.perm)
    mu_b = segment_reduce(rows, segments.offsets, "mean", backend=chosen)
    centred = rows - gather_rows(mu_b, segment_ids(segments.offsets, rows.shape[0]))
    counts = segments.counts.to(mean.dtype)
    if cov.dim() == 2:
        s_b = segment_reduce(centred * centred, segments.offsets, "mean", backend=chosen)
        _merge_diagonal_(cov, mean, amount, counts, mu_b, s_b)
        return
    present = counts > 0
    w = torch.where(present, counts / (counts + amount), 0)
    family_kernels(FAMILY).isda_update_full(cov, centred, segments.offsets, w, mean - mu_b)
    wv = w[:, None]
    mean.copy_(torch.where(present[:, None], (1 - wv) * mean + wv * mu_b, mean))
    amount.add_(counts)


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
    check_labels: bool | str = True,
    backend: str | None = None,
) -> bool:
    """In place: only the rows of classes present in the batch change.
    Returns True when the rows written are exactly symmetric (every kernel
    path, and any diagonal covariance), False for the reference's full update.

    backend: None (auto: "cpp" on CPU, "cuda" then "triton" on GPUs),
    "cpp" (full: a BLAS product and one symmetric merge pass per present
    class; diagonal: per-class sums in row order, then the merge, over column
    blocks), "cuda" (full: one launch accumulates and merges every class's
    batch scatter; diagonal: the shared segment reductions), "triton" (both
    on the shared segment reductions, the full merge in one program per
    (class, tile pair); CPU under TRITON_INTERPRET=1) or "reference"
    (:func:`dynkernels.reference.isda.update_estimator`, written back in
    place). No GPU path syncs with the host. The kernels take float32 and
    float64 estimators; auto runs others (float16, bfloat16) on the reference.
    Non-contiguous estimators are updated through contiguous copies; an
    estimator that overlaps itself (an expand()ed view) is refused.

    check_labels: the value checks, labels in [0, C) and amount >= 0 (see
    :func:`_check_labels`): True (CPU: ValueError; GPUs: a device-side
    assert, no sync), "sync" (ValueError everywhere, one host sync on GPUs)
    or False (labels outside [0, C) are dropped).

    sync=True (under torch.distributed) makes every rank's estimator see the
    global batch: the full covariance all-gathers the features and labels
    (N_global x A is small; C x A x A is not; the ranks' row counts are read
    on the host); the diagonal all-reduces the per-class counts and sums, then
    the centred squares (exact two-pass). Every rank then holds the estimator
    one process would hold after the concatenated batch (rank order)."""
    _check_update_args(features, labels, cov, mean, amount)
    classes = mean.shape[0]
    _check_labels(labels, classes, check_labels, amount)
    labels = labels.long()
    x = features.detach().to(mean.dtype)
    syncing = sync and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    if syncing and cov.dim() == 3:
        x, labels = _all_gather_rows(x, group), _all_gather_rows(labels, group)
    elif syncing:
        inside = (labels >= 0) & (labels < classes)
        target = torch.where(inside, labels, classes)
        ones = inside.to(x.dtype)
        counts = torch.zeros(classes + 1, dtype=x.dtype, device=x.device).index_add_(0, target, ones)[:classes]
        sums = torch.zeros(classes + 1, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, target, x)[:classes]
        dist.all_reduce(counts, group=group)
        dist.all_reduce(sums, group=group)
        mu = sums / counts.clamp(min=1)[:, None]
        centred = x - gather_rows(mu, target)  # rows of no class: a zero row, and they add into row C
        squares = torch.zeros(classes + 1, x.shape[1], dtype=x.dtype, device=x.device)
        squares = squares.index_add_(0, target, centred * centred)[:classes]
        dist.all_reduce(squares, group=group)
        _merge_diagonal_(cov, mean, amount, counts, mu, squares / counts.clamp(min=1)[:, None])
        return True
    if x.shape[0] == 0:
        return True
    chosen = resolve("isda_update_", cov.device, backend)
    if chosen != "reference" and not all(t.dtype == cov.dtype for t in (mean, amount)):
        raise ValueError(f"cov, mean and amount must share a dtype, got {cov.dtype}, {mean.dtype}, {amount.dtype}")
    if chosen != "reference" and cov.dtype not in _KERNEL_DTYPES:
        if backend is not None:
            raise ValueError(f"isda_update_(backend={backend!r}) takes float32 or float64 estimators, got {cov.dtype}")
        chosen = "reference"
    if chosen == "reference":
        new = reference.update_estimator(x, labels, cov, mean, amount)
        for target, value in zip((cov, mean, amount), new, strict=True):
            target.copy_(value)
        return cov.dim() == 2
    work = [t if t.is_contiguous() else t.contiguous() for t in (cov, mean, amount)]
    w_cov, w_mean, w_amount = work
    if chosen == "cpp" and cov.dim() == 3:
        torch.ops.dynkernels.isda_update_full_(w_cov, w_mean, w_amount, x, labels)
    elif chosen == "cpp":
        torch.ops.dynkernels.isda_update_diagonal_(w_cov, w_mean, w_amount, x, labels)
    elif chosen == "cuda" and cov.dim() == 3:
        torch.ops.dynkernels.isda_update_full_(w_cov, w_mean, w_amount, x, labels)
    else:
        _update_on_segments(chosen, x, labels, w_cov, w_mean, w_amount)
    for target, value in zip((cov, mean, amount), work, strict=True):
        if value is not target:
            target.copy_(value)
    return True


def _table_rows(labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the per-label table and each sample's row: eagerly the K_u
    distinct labels (torch.unique: its size is a host sync on GPUs). Under
    torch.compile a fixed-size axis instead, so one step compiles as one
    graph: every class when C <= N, else every sample (rows may repeat; the
    backward's index_add sums them). At most min(C, N) / K_u times the table's
    work."""
    if not torch.compiler.is_compiling():
        return torch.unique(labels, return_inverse=True)
    n = labels.shape[0]
    if classes <= n:
        return torch.arange(classes, device=labels.device), labels
    return labels, torch.arange(n, device=labels.device)


def _quad_table_full(weight: torch.Tensor, present: torch.Tensor, cov: torch.Tensor, symmetric: bool):
    """q[k, c] = (w_c - w_{p_k})^T Sigma_{p_k} (w_c - w_{p_k}) for the present labels
    p, and D sym(Sigma) (K, C, A) for the backward (D Sigma when Sigma is
    known to be exactly symmetric). No K x A x A gather: on CPU each Sigma_c
    is read in place (the labels are host memory there: no sync); on GPUs a
    chunk of classes at a time (at most _CHUNK_BYTES) is gathered on the
    device, the chunk bounds being host integers from shapes (no sync)."""
    d = weight.unsqueeze(0) - weight[present].unsqueeze(1)  # (K, C, A)
    ds = torch.empty_like(d)
    # d^T S d = d^T sym(S) d, and sym(S) d is the gradient's direction for any
    # S, as autograd of the official form gives (S d for a covariance).
    if present.device.type == "cpu" and not torch.compiler.is_compiling():
        for k, c in enumerate(present.tolist()):  # a CPU tensor: no device sync
            sigma = cov[c].to(weight.dtype)
            torch.matmul(d[k], sigma if symmetric else 0.5 * (sigma + sigma.T), out=ds[k])
        return (ds * d).sum(2), ds
    dim = weight.shape[1]
    chunk = max(1, _CHUNK_BYTES // max(1, dim * dim * weight.element_size()))
    for k0 in range(0, present.shape[0], chunk):
        sigma = cov.index_select(0, present[k0 : k0 + chunk]).to(weight.dtype)
        if not symmetric:
            sigma = 0.5 * (sigma + sigma.transpose(1, 2))
        torch.bmm(d[k0 : k0 + chunk], sigma, out=ds[k0 : k0 + chunk])
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
    """keep: None (every row counts) or (N,) bool, the rows whose label is not
    ignored (their labels already replaced by a valid class); the loss is the
    mean over the kept rows (0 when none is)."""

    @staticmethod
    def forward(ctx, logits, weight, labels, cov, lam, symmetric, keep):
        present, inverse = _table_rows(labels, logits.shape[1])
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
        per_row = lse - aug.gather(1, labels[:, None]).squeeze(1)
        if keep is None:
            loss = per_row.mean()
            row_weight = torch.full_like(lse, 1.0 / logits.shape[0])
        else:
            kept = keep.to(per_row.dtype)
            row_weight = kept / kept.sum().clamp_min(1)  # every row ignored: 0, not 0/0
            loss = (torch.where(keep, per_row, 0) * row_weight).sum()
        # Saved: the (K, C) table and the row log-sum-exps, not the (N, C)
        # augmented logits (rebuilt in the backward from the logits).
        ctx.save_for_backward(logits, q, lse, labels, present, inverse, weight, row_weight, *saved)
        ctx.lam = lam
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, q, lse, labels, present, inverse, weight, row_weight, *saved = ctx.saved_tensors
        n = logits.shape[0]
        aug = logits + (0.5 * ctx.lam) * q[inverse].to(logits.dtype)
        dz = torch.exp(aug - lse[:, None])
        dz[torch.arange(n, device=aug.device), labels] -= 1
        dz *= (grad * row_weight)[:, None]
        # gq = dL/dq: (lam / 2) times the logit gradients summed per label (the
        # shared scatter: row order on CPU, deterministic GPUs when asked).
        gq = (0.5 * ctx.lam) * scatter_add(dz, inverse, present.shape[0]).to(weight.dtype)
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
        return dz, d_weight, None, None, None, None, None


def _check_loss_args(logits: torch.Tensor, weight: torch.Tensor) -> None:
    check_tensor("logits", logits)
    check_tensor("weight", weight)
    check_same_device(logits=logits, weight=weight)
    check_floating("logits", logits)
    check_floating("weight", weight)
    if logits.dim() != 2 or weight.dim() != 2 or logits.shape[1] != weight.shape[0]:
        raise ValueError(
            f"logits (N, C) and weight (C, A) must agree, got {tuple(logits.shape)}, {tuple(weight.shape)}"
        )


def _check_batch(logits: torch.Tensor, op: str) -> None:
    """One rule for the three losses: an empty batch (N = 0) is a ValueError
    (a mean over nothing). ISDALoss's all-ignored segmentation batch is not
    empty: its rows are weighted out and the loss is 0 (see ignore_index)."""
    if logits.shape[0] == 0:
        raise ValueError(f"{op} needs a non-empty batch, got N = 0 rows of logits")


def _check_loss_labels(labels: torch.Tensor, logits: torch.Tensor) -> None:
    """Labels (N,) int32/int64 on the logits' device; their range is checked
    on CPU (free). On GPUs the losses' gathers trip a device-side assert on a
    bad label (no sync)."""
    n, classes = logits.shape
    check_tensor("labels", labels)
    check_same_device(logits=logits, labels=labels)
    if labels.dtype not in _INDEX_DTYPES or labels.shape != (n,):
        raise ValueError(
            f"labels must be (N,) = ({n},) int32/int64 class indices, got {tuple(labels.shape)} {labels.dtype}"
        )
    if labels.device.type == "cpu":
        _check_labels(labels, classes, "sync")


def isda_cross_entropy(
    logits: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cov: torch.Tensor,
    lam: float,
    *,
    assume_symmetric: bool = False,
    ignore_index: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the ISDA-augmented logits (Sigma detached, W not;
    the bias does not enter). logits (N, C), weight (C, A), labels (N,),
    cov (C, A, A) or (C, A). Gradients to logits and weight, as autograd of
    the official form gives them for any Sigma. assume_symmetric=True skips
    symmetrising each full Sigma_k for the weight gradient: pass it only for
    an exactly symmetric Sigma (what :func:`isda_update_` reports).
    ignore_index: rows with this label are left out: the mean over the rest,
    weighted rather than selected (a selection syncs on GPUs). A batch in
    which every row is ignored is legal (a segmentation crop of void pixels)
    and gives 0, connected to the graph (zero gradients); torch's
    cross_entropy gives NaN there. N = 0 rows is a ValueError.
    backend: None (auto: "composite", the per-label table) or "reference"
    (:func:`dynkernels.reference.isda.isda_loss`, per sample)."""
    _check_loss_args(logits, weight)
    lam = check_finite_real("lam", lam)
    classes = logits.shape[1]
    check_tensor("labels", labels)
    keep = None
    if ignore_index is not None:
        keep = labels != check_int("ignore_index", ignore_index)
        labels = torch.where(keep, labels, 0)
    _check_loss_labels(labels, logits)
    if cov.shape not in ((classes, weight.shape[1], weight.shape[1]), (classes, weight.shape[1])):
        raise ValueError(
            f"cov must be (C, A, A) or (C, A) with C={classes}, A={weight.shape[1]}, got {tuple(cov.shape)}"
        )
    _check_batch(logits, "isda_cross_entropy")
    chosen = resolve("isda_cross_entropy", logits.device, backend)
    if chosen == "reference":
        if keep is not None:
            if not bool(keep.any()):  # every row ignored: 0, in the graph
                return (logits * 0).sum() + (weight * 0).sum()
            logits, labels = logits[keep], labels[keep]
        return reference.isda_loss(logits, weight, labels.long(), cov, lam)
    return _ISDACrossEntropy.apply(logits, weight, labels.long(), cov, lam, bool(assume_symmetric), keep)


if has_extension():

    @torch.library.register_fake("dynkernels::isda_update_full_")
    def _(cov, mean, amount, features, labels):
        return None

    @torch.library.register_fake("dynkernels::isda_update_diagonal_")
    def _(var, mean, amount, features, labels):
        return None


def isda_consistency_loss(
    logits: Tensor, weight: Tensor, cov: Tensor, lam: float, *, detach_target: bool = True, backend: str | None = None
) -> Tensor:
    """Semi-supervised ISDA's consistency bound (derivation in
    :func:`dynkernels.reference.isda.isda_consistency_loss`), per predicted
    class: Q_k[c, j] = (w_j - w_c)^T Sigma_k (w_j - w_c) = s_jj + s_cc - 2 s_cj
    with S = W Sigma_k W^T (full) or (W∘v_k) W^T (diagonal), a C x C table per
    distinct predicted class instead of a (C, C, A) difference tensor per
    sample. W's rows are centred first (Q depends only on their differences),
    which keeps a shared offset out of the expansion's cancellation.
    The tables and the per-sample terms are built in chunks (classes, then
    samples) of bounded memory, with no host sync beyond torch.unique's.
    Autograd gives the gradients (Sigma detached, W not).
    backend: None (auto: "composite") or "reference" (per sample)."""
    _check_loss_args(logits, weight)
    lam = check_finite_real("lam", lam)
    classes, dim = weight.shape
    check_tensor("cov", cov)
    if cov.shape not in ((classes, dim, dim), (classes, dim)):
        raise ValueError(f"cov must be (C, A, A) or (C, A) with C={classes}, A={dim}, got {tuple(cov.shape)}")
    _check_batch(logits, "isda_consistency_loss")
    chosen = resolve("isda_consistency_loss", logits.device, backend)
    if chosen == "reference":
        return reference.isda_consistency_loss(logits, weight, cov, lam, detach_target=detach_target)
    cov = cov.detach()
    probs = torch.softmax(logits, dim=1)
    target = probs.detach() if detach_target else probs
    predicted = logits.detach().argmax(1)
    present, inverse = _table_rows(predicted, classes)
    wc = weight - weight.mean(0, keepdim=True).detach()
    itemsize = weight.element_size()
    chunk = max(
        1, _CHUNK_BYTES // max(1, (dim * dim if cov.dim() == 3 else dim) * itemsize + classes * classes * itemsize)
    )
    tables = []
    for k0 in range(0, present.shape[0], chunk):
        sigma = cov.index_select(0, present[k0 : k0 + chunk]).to(weight.dtype)
        if cov.dim() == 3:
            s = torch.matmul(torch.matmul(wc, sigma), wc.T)  # (k, C, C)
        else:
            s = torch.matmul(wc.unsqueeze(0) * sigma.unsqueeze(1), wc.T)
        diag = torch.diagonal(s, dim1=1, dim2=2)
        tables.append(diag.unsqueeze(1) + diag.unsqueeze(2) - s - s.transpose(1, 2))  # q[c, j]; exact for any Sigma
    q = torch.cat(tables)  # (K, C, C)
    per_sample = max(1, _CHUNK_BYTES // max(1, classes * classes * itemsize))
    loss = logits.new_zeros(())
    for i0 in range(0, logits.shape[0], per_sample):
        z, t = logits[i0 : i0 + per_sample], target[i0 : i0 + per_sample]
        aug = z.unsqueeze(1) + (0.5 * lam) * q.index_select(0, inverse[i0 : i0 + per_sample])  # (n, C "label" c, C j)
        ce = torch.logsumexp(aug, dim=2) - z
        loss = loss + (t * ce).sum() + (t * torch.log(t.clamp_min(1e-30))).sum()
    return loss / logits.shape[0]


def isda_cross_entropy_per_sample(
    logits: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    variance: torch.Tensor,
    lam: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ISDA-augmented logits with a per-sample diagonal
    variance (N, A), as LearnableISDA feeds from a meta-network: differentiable
    in logits, weight and variance. The term as three GEMMs,
    q = v (W∘W)^T - 2 (v∘W_y) W^T + rowsum(v∘W_y∘W_y), O(N C A) work and
    O(N C) memory instead of an (N, C, A) difference tensor; W's rows are
    centred first (q depends only on their differences).
    backend: None (auto: "composite") or "reference" (the difference tensor)."""
    _check_loss_args(logits, weight)
    lam = check_finite_real("lam", lam)
    check_tensor("variance", variance)
    check_same_device(logits=logits, variance=variance)
    if variance.dim() != 2 or variance.shape[0] != logits.shape[0]:
        raise ValueError(f"variance must be (N, A) with N = {logits.shape[0]}, got {tuple(variance.shape)}")
    if variance.shape[1] != weight.shape[1]:
        raise ValueError(
            f"variance (N, A) and weight (C, A) must agree on A, got variance {tuple(variance.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    _check_loss_labels(labels, logits)
    _check_batch(logits, "isda_cross_entropy_per_sample")
    labels = labels.long()
    chosen = resolve("isda_cross_entropy_per_sample", logits.device, backend)
    if chosen == "reference":
        return reference.isda_loss_per_sample(logits, weight, labels, variance, lam)
    wc = weight - weight.mean(0, keepdim=True).detach()
    wy = wc[labels]
    vwy = variance * wy
    q = variance @ (wc * wc).T - 2.0 * (vwy @ wc.T) + (vwy * wy).sum(1, keepdim=True)
    return torch.nn.functional.cross_entropy(logits + (0.5 * lam) * q, labels)
