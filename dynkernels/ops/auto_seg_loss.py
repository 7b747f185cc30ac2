"""Auto Seg-Loss (issue 17, part 2; arXiv 2010.07930): the searched metric
surrogates, fused, held to the official formulation
(:mod:`dynkernels.reference.auto_seg_loss`).

* ``bezier_surrogate(x, theta) -> h(x)``: the piecewise quadratic Bezier
  curve on [0, 1] through (0, 0), Q1, P1, Q2, ..., (1, 1) (theta = [Q1x,
  Q1y, P1x, P1y, ...], 4M - 2 numbers for M pieces), with the parameter
  root in its cancellation-free form t = x' / (q + sqrt(q^2 + (1 - 2q) x'))
  (equal to the official (q - sqrt(.)) / (2q - 1), and to t = x' at q =
  0.5, with no host sync to pick the case) and its derivative in closed
  form, h' = (dy/dt) / (2 sqrt(q^2 + (1 - 2q) x') (B_x - A_x)). Where the
  slope is infinite (q = 0 at the piece's start, q = 1 at its end) the
  derivative is taken as 0 (the official autograd gives inf or NaN there).
* ``surrogate_seg_loss(logits (N, C, H, W), target (N, H, W), theta=None, *,
  metric="miou", ignore_index=255, drop_bg=None, boundary_tolerance=5,
  eps=1e-8) -> ()``: one minus the surrogate metric (the official
  ``AutoSegLoss`` with loss_weight 1): "miou", "fwiou", "biou" (two curves:
  intersection and union), "macc", "gacc" (one curve), "bf1" (four curves).
  ``theta=None`` takes the metric's official retraining parameters
  (:data:`SURROGATE_PRESETS`); ``drop_bg=None`` the official preset's
  (True for BIoU, False for BF1; the other metrics ignore it).

Semantics and differences from the official code (documented in
docs/auto_seg_loss.md):

* Labels equal to ``ignore_index`` are ignored. Any other label outside [0,
  C) raises ValueError (the official code silently ignores it); on GPUs the
  check is a device-side assert (no host sync); ``check_labels=False`` turns
  it off (such labels are then ignored, as officially).
* FWIoU with no valid pixel and BF1 with no ground-truth edge are 0 / 0
  (NaN) in the official code; here the loss is 0, connected to the graph
  (its gradient is zero).
* BF1 keeps the official quirks: it ignores the valid mask (predicted edges
  at ignored pixels count), evaluates its four curves h1(s), h2(erode(s)),
  h3(s), h4(erode(s)), and averages F1 over the classes with edges.
* The loss accumulates in float32 for float16 / bfloat16 / float32 logits
  (float64 for float64) and is returned in that accumulation dtype.
* theta must be monotone: every curve's control points non-decreasing in x
  and y within [0, 1], each piece of positive width (the official search
  produces only such curves; a piece of zero width gives the official code
  NaN gradients).

Backends of surrogate_seg_loss: "cpp" (auto on CPU: mIoU, FWIoU, BIoU, mAcc
and gAcc in one pass over the logits forward and one back, nothing of pixel
size saved, deterministic class sums; csrc/auto_seg_loss/), "triton" (auto on
GPUs; the same passes as Triton kernels), "composite" (torch ops: labels
handled as label maps, the curves by ``bezier_surrogate``; BF1 on every
device), "reference" (the official formulation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ..reference import auto_seg_loss as ref
from ._registration import register_kernel_pairs
from ._validation import check_int, check_real, check_same_device, check_tensor

__all__ = ["SURROGATE_PRESETS", "bezier_surrogate", "boundary_region", "surrogate_seg_loss"]

FAMILY = "auto_seg_loss"
METRICS = ref.METRICS
register_op(
    "bezier_surrogate",
    FAMILY,
    ("reference", "composite"),
    reference=ref.bezier_surrogate,
    differentiable=("reference", "composite"),
)
_LOSS_BACKENDS = ("reference", "cpp", "triton", "composite")
register_op(
    "surrogate_seg_loss",
    FAMILY,
    _LOSS_BACKENDS,
    reference=ref.surrogate_seg_loss,
    differentiable=_LOSS_BACKENDS,
    auto={"cpu": ("cpp", "composite", "reference"), "cuda": ("triton", "composite", "reference")},
)

# The official retraining parameters (ASL_configs/retrain/*_bezier_10k.py;
# mIoU's as updated on 2021-05-07). FWIoU's and BIoU's are the same numbers,
# as are mAcc's and gAcc's, in the official configs.
_IOU_2020 = (
    3.65390355e-04, 9.84171689e-01, 9.69491959e-01, 9.92340326e-01, 9.88328516e-01, 9.95552719e-01,
    3.54609758e-01, 2.67221928e-01, 5.60551465e-01, 4.35290039e-01, 5.65432191e-01, 6.01448298e-01,
)  # fmt: skip
_ACC = (2.1453928e-02, 7.3905742e-01, 4.1163361e-01, 7.9865617e-01, 9.1986191e-01, 9.5041156e-01)
SURROGATE_PRESETS: dict[str, dict] = {
    "miou": {
        "theta": (
            5.69728440e-04, 6.43720450e-01, 3.38589169e-01, 7.05543360e-01, 6.25281252e-01, 7.79551927e-01,
            6.90375570e-01, 1.30628900e-02, 8.34170515e-01, 9.62431815e-01, 9.42998269e-01, 9.80038125e-01,
        ),  # fmt: skip
        "drop_bg": False,
    },
    "fwiou": {"theta": _IOU_2020, "drop_bg": False},
    "biou": {"theta": _IOU_2020, "drop_bg": True, "boundary_tolerance": 5},
    "macc": {"theta": _ACC, "drop_bg": False},
    "gacc": {"theta": _ACC, "drop_bg": False},
    "bf1": {
        "theta": (
            0.8113003373146057, 0.8526162505149841, 0.17164576053619385, 0.03164796531200409,
            0.20997394621372223, 0.44903290271759033, 0.07847517728805542, 0.8753038048744202,
        ),  # fmt: skip
        "drop_bg": False,
        "boundary_tolerance": 5,
    },
}
CURVES = {"miou": 2, "fwiou": 2, "biou": 2, "macc": 1, "gacc": 1, "bf1": 4}
_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LABEL_DTYPES = (torch.uint8, torch.int32, torch.int64)


# ---------------------------------------------------------------- theta


def check_theta(theta, curves: int = 1, name: str = "theta") -> tuple[float, ...]:
    """theta as a tuple of Python floats (`curves` curves of 4M - 2 numbers
    each), after checking that every curve is monotone (see the module
    docstring). Plain numbers keep torch.compile's graph whole; a tensor is
    read once (a host sync on GPUs, a graph break under compile)."""
    if isinstance(theta, torch.Tensor):
        if theta.dim() != 1 or theta.is_complex() or theta.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {tuple(theta.shape)}")
        theta = theta.detach().cpu().tolist()
    try:
        values = tuple(float(v) for v in theta)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got {theta!r}") from None
    per_curve, rest = divmod(len(values), curves)
    if rest or per_curve < 2 or per_curve % 4 != 2:
        raise ValueError(
            f"{name} must hold {curves} curve(s) of 4M - 2 numbers (2, 6, 10, ...), got {len(values)} numbers"
        )
    for k in range(curves):
        curve = values[k * per_curve : (k + 1) * per_curve]
        points = [(0.0, 0.0)] + [(curve[i], curve[i + 1]) for i in range(0, per_curve, 2)] + [(1.0, 1.0)]
        inside = all(0.0 <= v <= 1.0 for p in points for v in p)  # False for NaN too
        monotone = all(b[0] >= a[0] and b[1] >= a[1] for a, b in zip(points, points[1:]))
        widths = all(points[i + 2][0] > points[i][0] for i in range(0, len(points) - 2, 2))
        if not (inside and monotone and widths):
            raise ValueError(
                f"{name}: curve {k} must be monotone (control points non-decreasing in x and y within [0, 1], "
                f"each piece of positive width), got control points {points}"
            )
    return values


def _split(theta: tuple[float, ...], parts: int) -> list[tuple[float, ...]]:
    size = len(theta) // parts
    return [theta[k * size : (k + 1) * size] for k in range(parts)]


def _theta_for(metric: str, theta) -> tuple[float, ...]:
    return check_theta(SURROGATE_PRESETS[metric]["theta"] if theta is None else theta, CURVES[metric])


# ---------------------------------------------------------------- the curve


class _Bezier(torch.autograd.Function):
    """h(x) with the closed-form h'(x) (no autograd through the root)."""

    @staticmethod
    def forward(ctx, x, table):
        y, slope = _bezier_with_slope(x, table, x.requires_grad)
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope, None


def _piece_table(theta, like: torch.Tensor) -> torch.Tensor:
    """(M, 7): A_x, A_y, q, Q_y, B_x, B_y, 1 / (B_x - A_x) per piece of one
    curve (floats), in like's floating dtype and device."""
    cp = (0.0, 0.0, *(float(v) for v in theta), 1.0, 1.0)
    rows = []
    for k in range((len(cp) - 2) // 4):
        a_x, a_y, q_x, q_y, b_x, b_y = cp[4 * k : 4 * k + 6]
        rows.append([a_x, a_y, (q_x - a_x) / (b_x - a_x), q_y, b_x, b_y, 1.0 / (b_x - a_x)])
    return torch.tensor(rows, dtype=like.dtype if like.is_floating_point() else torch.float32, device=like.device)


def _bezier_with_slope(x: torch.Tensor, table: torch.Tensor, need_slope: bool):
    params = table[0]
    for k in range(1, table.shape[0]):  # the official choice: later pieces where x > A_x
        params = torch.where((x > table[k, 0]).unsqueeze(-1), table[k], params)
    a_x, a_y, q, q_y, b_x, b_y, inv_w = params.unbind(-1)
    xn = (x - a_x) * inv_w
    root = (q * q + (1 - 2 * q) * xn).clamp_min(0).sqrt()
    den = q + root
    t = torch.where(den > 0, xn / torch.where(den > 0, den, 1), 0)
    t = torch.where(x >= b_x, 1, t)  # exactly 1 at the piece's end
    u = 1 - t
    y = u * (u * a_y + 2 * t * q_y) + t * t * b_y  # Bernstein form: h(0) = 0, h(1) = 1 exactly
    if not need_slope:
        return y, None
    dydt = 2 * u * (q_y - a_y) + 2 * t * (b_y - q_y)
    slope = torch.where(root > 0, dydt * inv_w / (2 * torch.where(root > 0, root, 1)), 0)
    return y, slope


def bezier_surrogate(x: torch.Tensor, theta, *, backend=None) -> torch.Tensor:
    """See the module docstring. x: floating, any shape, values in [0, 1];
    theta: one curve (4M - 2 numbers)."""
    x = check_tensor("x", x)
    if not x.is_floating_point():
        raise TypeError(f"x must be floating, got {x.dtype}")
    t = check_theta(theta)
    if resolve("bezier_surrogate", x.device, backend) == "reference":
        return ref.bezier_surrogate(x, torch.tensor(t, dtype=x.dtype, device=x.device))
    return _Bezier.apply(x, _piece_table(t, x))


# ---------------------------------------------------------------- labels


def _check_labels(target: torch.Tensor, classes: int, ignore_index: int, check) -> None:
    if check is False or torch.compiler.is_compiling():
        return
    if check not in (True, "sync"):
        raise ValueError(f"check_labels must be True, 'sync' or False, got {check!r}")
    t = target.to(torch.int64) if target.dtype == torch.uint8 else target
    good = (((t >= 0) & (t < classes)) | (t == ignore_index)).all()
    if target.device.type == "cuda" and check is True:
        torch._assert_async(good, f"target labels must lie in [0, {classes}) or equal ignore_index={ignore_index}")
        return
    if not bool(good):
        bad = t[~(((t >= 0) & (t < classes)) | (t == ignore_index))]
        raise ValueError(
            f"target labels must lie in [0, {classes}) or equal ignore_index={ignore_index}; got "
            f"{bad.unique()[:8].tolist()} (the official code silently ignores them: check_labels=False does too)"
        )


def _valid(target: torch.Tensor, classes: int, ignore_index: int) -> torch.Tensor:
    return (target >= 0) & (target < classes) & (target != ignore_index)


def _label_edges(target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: valid pixels with a 3 x 3 neighbour (inside the image)
    of another label, ignored pixels counting as another label: the official
    ``compute_edge`` of the one-hot map, on the label map. Replicate padding
    repeats pixels of the window itself, so the border adds nothing."""
    h, w = target.shape[-2:]
    code = torch.where(valid, target.to(torch.int32), -1)
    padded = F.pad(code.unsqueeze(1).float(), (1, 1, 1, 1), mode="replicate").squeeze(1)
    center = code.float()
    edge = torch.zeros_like(valid)
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                edge |= padded[:, dy : dy + h, dx : dx + w] != center
    return edge & valid


def _max_filter(x: torch.Tensor, tol: int) -> torch.Tensor:
    """Separable (2 tol + 1)^2 max filter of x (N, K, H, W), pixels outside not counted."""
    if tol <= 0:
        return x
    k = 2 * tol + 1
    return F.max_pool2d(F.max_pool2d(x, (1, k), 1, (0, tol)), (k, 1), 1, (tol, 0))


def boundary_region(
    target: torch.Tensor, num_classes: int, *, ignore_index: int = 255, drop_bg: bool = True, boundary_tolerance: int = 5
) -> torch.Tensor:
    """BIoU's region (N, H, W) bool: valid pixels within ``boundary_tolerance``
    (a (2 tol + 1)^2 window) of a label edge (of a non-background class when
    ``drop_bg``), from the label map (the official trimap builds C one-hot
    planes, a 3 x 3 mean and a max pool of each)."""
    valid = _valid(target, num_classes, ignore_index)
    edge = _label_edges(target, valid)
    if drop_bg:
        edge &= target != 0
    near = _max_filter(edge.unsqueeze(1).to(torch.float32), boundary_tolerance).squeeze(1) > 0.5
    return near & valid


# ---------------------------------------------------------------- the loss


def _check_loss_args(logits, target, metric, ignore_index, tol, eps):
    logits, target = check_tensor("logits", logits), check_tensor("target", target)
    if logits.dim() != 4 or logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits must be floating (N, C, H, W), got {logits.dtype} {tuple(logits.shape)}")
    n, c, h, w = logits.shape
    if target.shape != (n, h, w):
        raise ValueError(f"target must be (N, H, W) = {(n, h, w)} to match logits, got {tuple(target.shape)}")
    if target.dtype not in _LABEL_DTYPES:
        raise TypeError(f"target must be int64, int32 or uint8 class indices, got {target.dtype}")
    check_same_device(logits=logits, target=target)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if c < 1:
        raise ValueError("logits must have at least one class")
    check_int("ignore_index", ignore_index)
    check_int("boundary_tolerance", tol, 0)
    eps = check_real("eps", eps)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return logits, target, eps


def surrogate_seg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    theta=None,
    *,
    metric: str = "miou",
    ignore_index: int = 255,
    drop_bg: bool | None = None,
    boundary_tolerance: int = 5,
    eps: float = 1e-8,
    check_labels=True,
    backend=None,
) -> torch.Tensor:
    """See the module docstring."""
    metric = metric.lower() if isinstance(metric, str) else metric
    logits, target, eps = _check_loss_args(logits, target, metric, ignore_index, boundary_tolerance, eps)
    th = _theta_for(metric, theta)
    if drop_bg is None:
        drop_bg = SURROGATE_PRESETS[metric]["drop_bg"]
    classes = logits.shape[1]
    _check_labels(target, classes, ignore_index, check_labels)
    if metric == "bf1" and backend is None:
        backend = "composite"  # BF1 has no kernel of its own yet: auto runs the composite
    chosen = resolve("surrogate_seg_loss", logits.device, backend)
    if chosen == "reference":
        theta_t = torch.tensor(th, dtype=torch.float64, device=logits.device)
        return ref.surrogate_seg_loss(
            logits, target, theta_t, metric, ignore_index, drop_bg, boundary_tolerance, eps, "zero"
        )
    if metric == "bf1":
        if chosen != "composite":
            raise ValueError(f"metric 'bf1' runs on the 'composite' backend only, not {chosen!r}")
        return _bf1_composite(logits, target, th, ignore_index, drop_bg, boundary_tolerance, eps)
    region = None
    if metric == "biou":
        region = boundary_region(
            target, classes, ignore_index=ignore_index, drop_bg=drop_bg, boundary_tolerance=boundary_tolerance
        )
    theta_i, theta_u = _split(th, 2) if CURVES[metric] == 2 else (th, ())
    if chosen == "composite":
        stats = _stats_composite(logits, target, region, theta_i, theta_u, ignore_index)
    else:
        op = torch.ops.dynkernels.surrogate_stats if chosen == "cpp" else torch.ops.dynkernels.surrogate_stats_triton
        region_u8 = None if region is None else region.to(torch.uint8)
        as_tensor = lambda t: torch.tensor(t, dtype=torch.float64)  # noqa: E731  (CPU: a constant under compile)
        stats = op(logits, target, region_u8, as_tensor(theta_i), as_tensor(theta_u), ignore_index)
    return _loss_from_stats(stats, metric, eps)


def _loss_from_stats(stats: torch.Tensor, metric: str, eps: float) -> torch.Tensor:
    """1 - metric from the (3, C) sums: intersection, the union's predicted
    part, class counts. No boolean selection: classes with no pixel add 0."""
    inter, rest, count = stats[0], stats[1], stats[2]
    if metric in ("macc", "gacc"):
        value = (inter / (count + eps)).mean() if metric == "macc" else inter.sum() / (count.sum() + eps)
        return 1 - value
    iou = inter / (rest + count + eps)
    if metric != "fwiou":
        return 1 - iou.mean()
    total = count.sum()
    value = (iou * count).sum() / total.clamp_min(1)
    return torch.where(total > 0, 1 - value, stats.sum() * 0)  # no class present: 0, in the graph


def _stats_composite(logits, target, region, theta_i, theta_u, ignore_index):
    """The (3, C) sums of the kernels, in torch ops (per-class planes of the one-hot)."""
    classes = logits.shape[1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    s = torch.softmax(logits.to(acc), 1)
    valid = _valid(target, classes, ignore_index)
    if region is not None:
        valid = valid & region
    own = (target.unsqueeze(1) == torch.arange(classes, device=target.device).view(1, -1, 1, 1)) & valid.unsqueeze(1)
    other = valid.unsqueeze(1) & ~own
    h1 = _Bezier.apply(s, _piece_table(theta_i, s))
    inter = (h1 * own).sum((0, 2, 3))
    if theta_u:
        rest = (_Bezier.apply(s, _piece_table(theta_u, s)) * other).sum((0, 2, 3))
    else:
        rest = torch.zeros_like(inter)
    return torch.stack([inter, rest, own.sum((0, 2, 3)).to(acc)])


def _bf1_composite(logits, target, theta, ignore_index, drop_bg, tol, eps):
    """BF1 (official quirks kept): ground-truth edges from the label map, the
    soft edges of four curves, separable dilations."""
    n, classes, h, w = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    s = torch.softmax(logits.to(acc), 1)
    valid = _valid(target, classes, ignore_index)
    edge_label = torch.where(_label_edges(target, valid), target.to(torch.int64), classes)
    edge_y = F.one_hot(edge_label, classes + 1)[..., :classes].permute(0, 3, 1, 2).to(acc)
    with torch.no_grad():
        near_y = _max_filter(edge_y, tol)
    erode = -F.max_pool2d(-F.pad(s, (1, 1, 1, 1), value=1.0), 3, stride=1)
    tables = [_piece_table(t, s) for t in _split(theta, 4)]
    h3, h4 = _Bezier.apply(s, tables[2]), _Bezier.apply(erode, tables[3])
    edge_s = h3 + h4 - h3 * h4 - _Bezier.apply(s, tables[0]) * _Bezier.apply(erode, tables[1])
    near_s = F.max_pool2d(edge_s, 2 * tol + 1, stride=1, padding=tol) if tol > 0 else edge_s
    freq = edge_y.sum((0, 2, 3))
    p = (edge_s * near_y).sum((0, 2, 3)) / (edge_s.sum((0, 2, 3)) + eps)
    r = (near_s * edge_y).sum((0, 2, 3)) / (freq + eps)
    f1 = 2 * p * r / (p + r + eps)
    if drop_bg:
        f1, freq = f1[1:], freq[1:]
    present = (freq > 0).to(acc)
    total = present.sum()
    value = (f1 * present).sum() / total.clamp_min(1)
    return torch.where(total > 0, 1 - value, f1.sum() * 0)


# ---------------------------------------------------------------- kernels' plumbing


@torch.library.custom_op("dynkernels::surrogate_stats_triton", mutates_args=())
def _stats_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    region: torch.Tensor | None,
    theta_i: torch.Tensor,
    theta_u: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    return family_kernels(FAMILY).surrogate_stats(logits, target, region, theta_i, theta_u, ignore_index)


@torch.library.custom_op("dynkernels::surrogate_stats_backward_triton", mutates_args=())
def _stats_backward_triton(
    grad: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    region: torch.Tensor | None,
    theta_i: torch.Tensor,
    theta_u: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    kernels = family_kernels(FAMILY)
    return kernels.surrogate_stats_backward(grad, logits, target, region, theta_i, theta_u, ignore_index)


def _fake_stats(logits, target, region, theta_i, theta_u, ignore_index):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty((3, logits.shape[1]), dtype=acc)


def _fake_stats_backward(grad, logits, target, region, theta_i, theta_u, ignore_index):
    return logits.new_empty(logits.shape)


def _stats_setup(ctx, inputs, output):
    logits, target, region, theta_i, theta_u, ignore_index = inputs
    ctx.save_for_backward(logits, target, region, theta_i, theta_u)
    ctx.ignore_index = ignore_index


def _stats_backward(ctx, backward_op, grad):
    logits, target, region, theta_i, theta_u = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    g = backward_op(grad.contiguous(), logits, target, region, theta_i, theta_u, ctx.ignore_index)
    return g, None, None, None, None, None


register_kernel_pairs(
    ([("dynkernels::surrogate_stats", "dynkernels::surrogate_stats_backward")] if has_extension() else [])
    + [("dynkernels::surrogate_stats_triton", "dynkernels::surrogate_stats_backward_triton")],
    fake=_fake_stats,
    fake_backward=_fake_stats_backward,
    setup_context=_stats_setup,
    backward=_stats_backward,
)

