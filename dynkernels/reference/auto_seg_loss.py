"""Auto Seg-Loss (arXiv 2010.07930): the official formulation in plain
PyTorch, written from the math and control flow of the official
``AutoSegLoss`` (mmseg/models/losses/auto_seg_loss.py and
mmseg/core/evaluation/utils.py): the yardstick of the kernels.

* ``bezier_surrogate(x, theta)``: the piecewise quadratic Bezier curve h on
  [0, 1] through (0, 0), Q1, P1, Q2, ..., (1, 1), theta = [Q1x, Q1y, P1x,
  P1y, ...] (4M - 2 numbers for M pieces). Each piece is evaluated on x
  clamped to it (x outside gives the piece's end point), t from the
  quadratic formula (t = x' where q = 0.5), and the pieces are combined by
  ``where`` in the official order.
* ``surrogate_seg_loss(logits, target, theta, metric, ...)``: one minus the
  surrogate metric on softmax(logits) and the one-hot target; labels
  outside [0, C) (ignore_index among them) are ignored, as the official
  code does. ``empty="nan"`` keeps the official NaN of FWIoU and BF1 when
  no class is present (no valid pixel / no edge); ``"zero"`` returns a zero
  loss that is part of the graph (what :func:`dynkernels.ops.surrogate_seg_loss`
  does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bezier_surrogate", "surrogate_seg_loss"]

METRICS = ("miou", "fwiou", "macc", "gacc", "biou", "bf1")


def _quadratic_root(a_x, q_x, b_x, x):
    """The official ``_quadratic_solver``: t of x on the piece from a_x to b_x."""
    q = (q_x - a_x) / (b_x - a_x)
    xn = (x - a_x) / (b_x - a_x)
    if float(q) == 0.5:
        return xn
    return (q - torch.sqrt(q**2 + (1 - 2 * q) * xn)) / (2 * q - 1)


def bezier_surrogate(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The official ``_bezier``: see the module docstring."""
    theta = torch.as_tensor(theta, dtype=x.dtype, device=x.device)
    cp = torch.cat([x.new_zeros(2), theta, x.new_ones(2)])  # (0, 0), Q1, P1, ..., (1, 1)
    pieces = []
    for k in range((cp.numel() - 2) // 4):
        a_x, a_y, q_x, q_y, b_x, b_y = cp[4 * k : 4 * k + 6]
        inside = x <= b_x if k == 0 else (x > a_x) & (x <= b_x)
        t = _quadratic_root(a_x, q_x, b_x, torch.where(inside, x, b_x))
        pieces.append((1 - t) ** 2 * a_y + 2 * t * (1 - t) * q_y + t**2 * b_y)
    y = pieces[0]
    for k in range(1, len(pieces)):
        a_x, b_x = cp[4 * k], cp[4 * k + 4]
        y = torch.where((x > a_x) & (x <= b_x), pieces[k], y)
    return y


def _one_hot(target: torch.Tensor, classes: int) -> torch.Tensor:
    """The official ``map_to_one_hot``: labels outside [0, C) give a zero row."""
    n, h, w = target.shape
    t = torch.where((target >= 0) & (target < classes), target, classes).long()
    onehot = torch.zeros(n, classes + 1, h, w, dtype=torch.float64, device=target.device)
    return onehot.scatter_(1, t.view(n, 1, h, w), 1.0)[:, :classes]


def _edge(onehot: torch.Tensor) -> torch.Tensor:
    """The official ``compute_edge``: y where the 3 x 3 mean (no padding counted) differs from y."""
    mean = F.avg_pool2d(onehot, 3, stride=1, padding=1, count_include_pad=False)
    return (onehot != mean).to(onehot.dtype) * onehot


def _dilate(x: torch.Tensor, tol: int) -> torch.Tensor:
    return F.max_pool2d(x, 2 * tol + 1, stride=1, padding=tol) if tol > 0 else x


def _iou(h_i, h_u, y, mask, eps):
    inter = (h_i * y * mask).sum((0, 2, 3))
    union = ((h_u + y - h_u * y) * mask).sum((0, 2, 3)) + eps
    return inter / union


def _bf1(s, y, thetas, eps, drop_bg, tol):
    erode_y = -F.max_pool2d(-F.pad(y, (1, 1, 1, 1), value=1.0), 3, stride=1)
    edge_y = (erode_y != y).to(s.dtype)
    erode_s = -F.max_pool2d(-F.pad(s, (1, 1, 1, 1), value=1.0), 3, stride=1)
    h1, h2, h3, h4 = (
        bezier_surrogate(s, thetas[0]),
        bezier_surrogate(erode_s, thetas[1]),
        bezier_surrogate(s, thetas[2]),
        bezier_surrogate(erode_s, thetas[3]),
    )
    edge_s = (h3 + h4 - h3 * h4) - h1 * h2
    freq = edge_y.sum((0, 2, 3))
    n_gt, n_fg = freq + eps, edge_s.sum((0, 2, 3)) + eps
    match_fg = (edge_s * _dilate(edge_y, tol)).sum((0, 2, 3))
    match_gt = (_dilate(edge_s, tol) * edge_y).sum((0, 2, 3))
    p, r = match_fg / n_fg, match_gt / n_gt
    f1 = 2 * p * r / (p + r + eps)
    if drop_bg:
        f1, freq = f1[1:], freq[1:]
    return f1[freq != 0].mean()


def surrogate_seg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    theta: torch.Tensor,
    metric: str = "miou",
    ignore_index: int = 255,
    drop_bg: bool = False,
    boundary_tolerance: int = 5,
    eps: float = 1e-8,
    empty: str = "nan",
) -> torch.Tensor:
    """See the module docstring. Computes in the logits' dtype (float64 for
    parity tests); theta as in the official configs (2 curves for the IoU
    metrics, 1 for the accuracies, 4 for BF1)."""
    n, c, h, w = logits.shape
    target = torch.where(target == ignore_index, c, target)
    valid = ((target >= 0) & (target < c)).unsqueeze(1).to(logits.dtype)
    y = _one_hot(target, c).to(logits.dtype)
    s = torch.softmax(logits, 1)
    theta = torch.as_tensor(theta, dtype=logits.dtype, device=logits.device)
    if metric == "bf1":
        value = _bf1(s, y, theta.chunk(4), eps, drop_bg, boundary_tolerance)
        defined = (_edge(y).sum((0, 2, 3))[1 if drop_bg else 0 :] > 0).any()
    elif metric in ("miou", "fwiou", "biou"):
        if metric == "biou":
            dilated = _dilate(_edge(y), boundary_tolerance)
            trimap = (dilated[:, 1:] if drop_bg else dilated).amax(1, keepdim=True) > 0.5
            valid = valid * trimap.to(valid.dtype)
        h_i, h_u = bezier_surrogate(s, theta.chunk(2)[0]), bezier_surrogate(s, theta.chunk(2)[1])
        iou = _iou(h_i, h_u, y, valid, eps)
        freq = y.sum((0, 2, 3))
        defined = (freq > 0).any() if metric == "fwiou" else True
        if metric == "fwiou":
            value = (iou[freq > 0] * freq[freq > 0]).sum() / freq[freq > 0].sum()
        else:
            value = iou.mean()
    elif metric in ("macc", "gacc"):
        inter = bezier_surrogate(s, theta) * y
        freq = y.sum((0, 2, 3))
        defined = True
        value = (inter.sum((0, 2, 3)) / (freq + eps)).mean() if metric == "macc" else inter.sum() / (freq.sum() + eps)
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    loss = 1 - value
    if empty == "zero" and not bool(defined):
        return logits.sum() * 0
    return loss
