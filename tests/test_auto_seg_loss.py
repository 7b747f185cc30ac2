"""Auto Seg-Loss (issue 17, part 2) against a float64 transcription of the
official code (mmseg/models/losses/auto_seg_loss.py with its in-place Bezier
path, and mmseg/core/evaluation/utils.py), written here from its control
flow: every backend, every metric, the edge paths (ignored pixels, absent
classes, one class, a batch of one, no edges), the truth table on one-hot
predictions, gradients, opcheck, compile, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_clear_error, assert_close_to_float64, bad_input_params, kernel_cases

from dynkernels import ops
from dynkernels.reference import auto_seg_loss as ref

PRESETS = ops.SURROGATE_PRESETS


# ------------------------------------------------ the official code, transcribed


def official_solver(x0, x1, x2, x):
    x1_new = (x1 - x0) / (x2 - x0)
    x_new = x.add_(-x0).div_(x2 - x0)
    if x1_new == 0.5:
        return x_new
    return x_new.mul_(1 - 2 * x1_new).add_(x1_new**2).sqrt_().mul(-1).add_(x1_new).div_(2 * x1_new - 1)


def official_bezier(x, control_points):
    cp = torch.cat([control_points, control_points.new_ones(2)])
    ys = []
    for n in range(0, len(cp), 4):
        if n == 0:
            part = x.where(x <= cp[n + 2], cp[n + 2])
            t = official_solver(part.new_zeros(1), cp[n], cp[n + 2], part)
            y = t.mul(2 * cp[n + 1]).add_(t.square().mul_(cp[n + 3] - 2 * cp[n + 1]))
        else:
            part = x.where((x > cp[n - 2]) & (x <= cp[n + 2]), cp[n + 2])
            t = official_solver(cp[n - 2], cp[n], cp[n + 2], part)
            y = (
                t.mul(2 * cp[n + 1] - 2 * cp[n - 1])
                .add_(t.square().mul_(cp[n - 1] - 2 * cp[n + 1] + cp[n + 3]))
                .add_(cp[n - 1])
            )
        ys.append(y)
    y = ys[0]
    for n, part in enumerate(ys[1:]):
        y = part.where((x > cp[4 * n + 2]) & (x <= cp[4 * n + 6]), y)
    return y


def official_one_hot(x, num_class):
    b, h, w = x.shape
    x = x.where((x >= 0) & (x < num_class), torch.tensor([num_class], dtype=x.dtype))
    onehot = x.new_zeros((b, num_class + 1, h, w), dtype=torch.float64)
    return onehot.scatter_(1, x.long().view(b, 1, h, w), 1)[:, :-1].contiguous()


def official_edge(seg):
    avg = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)(seg)
    return (seg != avg).double() * seg


def official_dilate(seg, tol):
    return torch.nn.MaxPool2d(2 * tol + 1, stride=1, padding=tol)(seg)


def official_metric(inp, target, mask, theta, metric, eps, drop_bg, tol):
    n, c, h, w = inp.shape
    if metric in ("miou", "fwiou", "biou"):
        if metric == "biou":
            dil = official_dilate(official_edge(target), tol) if tol > 0 else official_edge(target)
            trimap = (dil[:, 1:] if drop_bg else dil).max(dim=1).values > 0.5
            mask = mask & trimap
        m = mask.double().view(n, 1, h, w)
        hi, hu = official_bezier(inp, theta[: len(theta) // 2]), official_bezier(inp, theta[len(theta) // 2 :])
        inter = (hi * target * m).sum(3).sum(2).sum(0)
        union = ((hu + target - hu * target) * m).sum(3).sum(2).sum(0) + eps
        iou = inter / union
        if metric != "fwiou":
            return iou.mean()
        freq = target.sum(3).sum(2).sum(0)
        return (iou[freq > 0] * freq[freq > 0]).sum() / freq[freq > 0].sum()
    if metric in ("macc", "gacc"):
        inter = official_bezier(inp, theta) * target
        if metric == "macc":
            return (inter.sum(3).sum(2).sum(0) / (target.sum(3).sum(2).sum(0) + eps)).mean()
        return inter.sum() / (target.sum() + eps)
    # bf1
    pad = torch.nn.ConstantPad2d(1, 1.0)
    pool = torch.nn.MaxPool2d(3, stride=1, padding=0)
    target_edge = (-1 * pool(-pad(target)) != target).double()
    erode = -1 * pool(-pad(inp))
    q = len(theta) // 4
    t1, t2, t3, t4 = theta[:q], theta[q : 2 * q], theta[2 * q : 3 * q], theta[3 * q :]
    inter = official_bezier(inp, t1) * official_bezier(erode, t2)
    union = (
        official_bezier(inp, t3)
        + official_bezier(erode, t4)
        - official_bezier(inp, t3) * official_bezier(erode, t4)
    )
    edge = union - inter
    td, idil = (official_dilate(target_edge, tol), official_dilate(edge, tol)) if tol > 0 else (target_edge, edge)
    freq = target_edge.sum(3).sum(2).sum(0)
    p = torch.sum(edge * td, 3).sum(2).sum(0) / (edge.sum(3).sum(2).sum(0) + eps)
    r = torch.sum(idil * target_edge, 3).sum(2).sum(0) / (freq + eps)
    f1 = (2 * p * r / (p + r + eps)).view(-1)
    return f1[1:][freq[1:] != 0].mean() if drop_bg else f1[freq != 0].mean()


def official_loss(logits, label, theta, metric, drop_bg=None, tol=5, eps=1e-8):
    """AutoSegLoss.forward with loss_weight 1 (labels outside [0, C) ignored)."""
    c = logits.shape[1]
    drop_bg = PRESETS[metric]["drop_bg"] if drop_bg is None else drop_bg
    target = label.where((label >= 0) & (label < c), torch.tensor([c], dtype=label.dtype))
    mask = (target >= 0) & (target < c)
    pred = torch.softmax(logits, 1)
    theta = torch.as_tensor(theta, dtype=torch.float64)
    return 1 - official_metric(pred, official_one_hot(target, c), mask, theta, metric, eps, drop_bg, tol)


# ------------------------------------------------ inputs


def _problem(n=2, c=5, h=13, w=11, seed=0, ignore_frac=0.15, absent=None, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * scale
    # blobs of labels (edges and interiors), some ignored pixels
    coarse = torch.randint(0, c, (n, 1, (h + 3) // 4, (w + 3) // 4), generator=g).double()
    label = F.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()
    label[torch.rand(n, h, w, generator=g) < ignore_frac] = 255
    if absent is not None:
        label[label == absent] = (absent + 1) % c
    return logits, label


def _theta(metric):
    return torch.tensor(PRESETS[metric]["theta"], dtype=torch.float64)


def random_curve(pieces, g):
    """A monotone curve through the official search's reparameterisation."""
    u = torch.rand(2 * pieces - 1, 2, generator=g, dtype=torch.float64) * 0.98 + 0.01
    for k in range(1, u.shape[0]):
        u[k] = u[k] * (1 - u[k - 1]) + u[k - 1]
    return u.reshape(-1)


# ------------------------------------------------ the curve


CURVES = [_theta("miou")[:6], _theta("miou")[6:], _theta("macc"), _theta("bf1")[:2], _theta("bf1")[6:]]
CURVES += [torch.tensor([0.25, 0.25, 0.5, 0.5, 0.75, 0.75], dtype=torch.float64)]  # q = 0.5 on both pieces


@pytest.mark.parametrize("theta", CURVES + [random_curve(m, torch.Generator().manual_seed(m)) for m in (1, 2, 3)])
def test_bezier_equals_the_official_curve(theta):
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(4000, generator=g, dtype=torch.float64), theta[0::2], torch.tensor([0.0, 1.0])])
    x = x.double().requires_grad_()
    want = official_bezier(x.detach().clone().requires_grad_(), theta)
    xo = x.detach().clone().requires_grad_()
    official = official_bezier(xo, theta)
    official.sum().backward()
    got = ops.bezier_surrogate(x, theta)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-14)
    got.sum().backward()
    finite = torch.isfinite(xo.grad)
    torch.testing.assert_close(x.grad[finite], xo.grad[finite], rtol=1e-9, atol=1e-9)
    assert torch.isfinite(x.grad).all()
    assert torch.equal(ops.bezier_surrogate(x.detach(), theta, backend="reference"), ref.bezier_surrogate(x.detach(), theta))


def test_bezier_truth_table_and_gradcheck():
    for theta in CURVES:
        ends = ops.bezier_surrogate(torch.tensor([0.0, 1.0], dtype=torch.float64), theta)
        assert ends.tolist() == [0.0, 1.0]
    x = torch.rand(40, dtype=torch.float64).mul(0.98).add(0.01).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: ops.bezier_surrogate(v, CURVES[1]), (x,))


# ------------------------------------------------ the loss: every backend, every metric

REGION = ("miou", "fwiou", "biou", "macc", "gacc")
LOSS = kernel_cases("surrogate_seg_loss")


def _cases(metrics):
    out = []
    for p in LOSS:
        device, backend = p.values
        for metric in metrics:
            if metric == "bf1" and backend != "composite":
                continue
            out.append(pytest.param(device, backend, metric, id=f"{p.id}-{metric}", marks=p.marks))
    return out


@pytest.mark.parametrize("device,backend,metric", _cases(ref.METRICS))
def test_loss_equals_the_official_code_float64(device, backend, metric):
    logits, label = _problem(absent=3)
    x = logits.clone().requires_grad_()
    want = official_loss(x, label, _theta(metric), metric)
    (gw,) = torch.autograd.grad(want, x)
    y = logits.to(device).requires_grad_()
    got = ops.surrogate_seg_loss(y, label.to(device), metric=metric, backend=backend)
    (gg,) = torch.autograd.grad(got, y)
    torch.testing.assert_close(got.cpu(), want.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(gg.cpu(), gw, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device,backend,metric", _cases(ref.METRICS))
def test_loss_float32_two_times_rule(device, backend, metric):
    logits, label = _problem(n=2, c=7, h=24, w=19, seed=3)
    theta = _theta(metric)
    x64 = logits.clone().requires_grad_()
    want = official_loss(x64, label, theta, metric)
    (g64,) = torch.autograd.grad(want, x64)
    x32 = logits.float().requires_grad_()
    torch_loss = ref.surrogate_seg_loss(x32, label, theta.float(), metric, 255, PRESETS[metric]["drop_bg"])
    (g_torch,) = torch.autograd.grad(torch_loss, x32)
    y = logits.float().to(device).requires_grad_()
    got = ops.surrogate_seg_loss(y, label.to(device), metric=metric, backend=backend)
    (g_ours,) = torch.autograd.grad(got, y)
    assert got.dtype == torch.float32
    assert_close_to_float64(got.cpu(), torch_loss.detach(), want.detach())
    assert_close_to_float64(g_ours.cpu(), g_torch, g64)


@pytest.mark.parametrize("device,backend", LOSS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_accumulate_in_float32(device, backend, dtype):
    logits, label = _problem(c=6, h=17, w=15, seed=4)
    half = logits.to(dtype)
    for metric in ("miou", "gacc"):
        want = official_loss(half.double(), label, _theta(metric), metric)
        got = ops.surrogate_seg_loss(half.to(device), label.to(device), metric=metric, backend=backend)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("device,backend,metric", _cases(ref.METRICS))
def test_edge_paths(device, backend, metric):
    def run(logits, label):
        x = logits.clone().requires_grad_()
        want = official_loss(x, label, _theta(metric), metric)
        y = logits.to(device).requires_grad_()
        got = ops.surrogate_seg_loss(y, label.to(device), metric=metric, backend=backend)
        return x, want, y, got

    # a batch of one; one class only; an image smaller than BIoU's / BF1's 11 x 11 window
    for logits, label in (_problem(n=1, seed=5), _problem(n=2, c=1, seed=6, ignore_frac=0.3), _problem(h=4, w=3)):
        if metric == "biou" and logits.shape[1] == 1:  # drop_bg leaves no class: the official max() raises
            with pytest.raises(IndexError):
                official_loss(logits, label, _theta(metric), metric)
            got = ops.surrogate_seg_loss(logits.to(device), label.to(device), metric=metric, backend=backend)
            assert got.item() == 1.0  # an empty region: every IoU 0 / eps
            continue
        x, want, y, got = run(logits, label)
        if torch.isnan(want):  # the official 0 / 0 (no edge at all): a zero loss in the graph
            assert metric in ("fwiou", "bf1") and got.item() == 0 and got.requires_grad
            continue
        torch.testing.assert_close(got.cpu(), want.detach(), rtol=0, atol=1e-12)
        (gw,), (gg,) = torch.autograd.grad(want, x), torch.autograd.grad(got, y)
        torch.testing.assert_close(gg.cpu(), gw, rtol=0, atol=1e-12)
    # every pixel ignored
    logits, label = _problem(n=2, seed=7)
    label.fill_(255)
    x, want, y, got = run(logits, label)
    (gg,) = torch.autograd.grad(got, y)
    assert torch.count_nonzero(gg) == 0
    if metric in ("fwiou", "bf1"):
        assert torch.isnan(want) and got.item() == 0.0
    else:
        torch.testing.assert_close(got.cpu(), want.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("metric", ref.METRICS)
def test_truth_table_one_hot_predictions_give_the_true_metric(metric):
    """On exactly one-hot predictions h(0) = 0, h(1) = 1 make every surrogate
    the true metric of the predicted label map."""
    c = 4
    logits, label = _problem(n=2, c=c, h=23, w=21, seed=8)
    pred = torch.randint(0, c, label.shape)
    pred[:, 5:15, 4:12] = label[:, 5:15, 4:12].clamp(max=c - 1)  # some agreement
    onehot_logits = F.one_hot(pred, c).permute(0, 3, 1, 2).double() * 2000  # softmax exactly 0 / 1
    got = 1 - ops.surrogate_seg_loss(onehot_logits, label, metric=metric).item()
    valid = label != 255
    y, p = official_one_hot(label, c), official_one_hot(pred, c) * valid.unsqueeze(1)
    if metric in ("miou", "fwiou", "biou"):
        m = valid.unsqueeze(1).double()
        if metric == "biou":
            trimap = official_dilate(official_edge(y), 5)[:, 1:].amax(1, keepdim=True) > 0.5
            m = m * trimap
        inter, union = (p * y * m).sum((0, 2, 3)), ((p + y - p * y) * m).sum((0, 2, 3)) + 1e-8
        iou, freq = inter / union, y.sum((0, 2, 3))
        true = (iou * freq).sum() / freq.sum() if metric == "fwiou" else iou.mean()
    elif metric == "macc":
        true = ((p * y).sum((0, 2, 3)) / (y.sum((0, 2, 3)) + 1e-8)).mean()
    elif metric == "gacc":
        true = (p * y).sum() / (y.sum() + 1e-8)
    else:  # the official bfscore_val: edges of the one-hot maps, 11 x 11 matching
        pe, te = official_edge(official_one_hot(pred, c)), official_edge(y)
        pr = (pe * official_dilate(te, 5)).sum((0, 2, 3)) / (pe.sum((0, 2, 3)) + 1e-8)
        rc = (official_dilate(pe, 5) * te).sum((0, 2, 3)) / (te.sum((0, 2, 3)) + 1e-8)
        f1 = 2 * pr * rc / (pr + rc + 1e-8)
        true = f1[te.sum((0, 2, 3)) > 0].mean()
    assert abs(got - float(true)) < 1e-6


def test_boundary_region_is_the_official_trimap():
    for seed, drop_bg, tol in ((0, True, 5), (1, False, 2), (2, True, 0)):
        _, label = _problem(n=2, c=4, h=31, w=26, seed=seed)
        y = official_one_hot(label, 4)
        dil = official_dilate(official_edge(y), tol) if tol else official_edge(y)
        trimap = (dil[:, 1:] if drop_bg else dil).max(1).values > 0.5
        want = trimap & (label != 255)
        got = ops.boundary_region(label, 4, drop_bg=drop_bg, boundary_tolerance=tol)
        assert torch.equal(got, want)


# ------------------------------------------------ labels


@pytest.mark.parametrize("device,backend", LOSS)
def test_label_dtypes_and_ignore_index(device, backend):
    logits, label = _problem(c=5, seed=9)
    base = ops.surrogate_seg_loss(logits.to(device), label.to(device), backend=backend)
    for dtype in (torch.int32, torch.uint8):
        other = ops.surrogate_seg_loss(logits.to(device), label.to(dtype).to(device), backend=backend)
        torch.testing.assert_close(other, base, rtol=0, atol=1e-14)
    # an ignore_index inside [0, C): class 2's pixels are ignored
    relabelled = label.clone()
    relabelled[label == 255] = 2
    want = official_loss(logits, torch.where(relabelled == 2, 255, relabelled), _theta("miou"), "miou")
    got = ops.surrogate_seg_loss(logits.to(device), relabelled.to(device), ignore_index=2, backend=backend)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-12)


def test_labels_out_of_range_raise_unless_unchecked():
    logits, label = _problem(c=5, seed=10)
    bad = label.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match="official code silently ignores"):
        ops.surrogate_seg_loss(logits, bad)
    want = official_loss(logits, bad, _theta("miou"), "miou")
    for backend in ("cpp", "composite", "reference"):
        got = ops.surrogate_seg_loss(logits, bad, check_labels=False, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# ------------------------------------------------ gradients, opcheck, compile, determinism


@pytest.mark.parametrize("device,backend", LOSS)
@pytest.mark.parametrize("metric", ["miou", "biou", "macc", "bf1"])
def test_gradcheck(device, backend, metric):
    if metric == "bf1" and backend != "composite":
        pytest.skip("BF1 runs on the composite backend")
    logits, label = _problem(n=1, c=3, h=7, w=6, seed=11, scale=1.0)
    x = logits.to(device).requires_grad_()
    fn = lambda v: ops.surrogate_seg_loss(v, label.to(device), metric=metric, boundary_tolerance=1, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=backend == "triton")


def _stats_args(device="cpu", dtype=torch.float64, region=True):
    logits, label = _problem(n=2, c=5, h=9, w=7, seed=12)
    th = _theta("miou")
    r = ops.boundary_region(label, 5, boundary_tolerance=1).to(torch.uint8) if region else None
    t = logits.to(device, dtype).transpose(2, 3)  # non-contiguous
    return (t, label.transpose(1, 2).to(device), None if r is None else r.transpose(1, 2).to(device), th[:6], th[6:], 255)


@pytest.mark.parametrize("device,backend", [p for p in LOSS if p.values[1] in ("cpp", "triton")])
def test_opcheck(device, backend):
    op = torch.ops.dynkernels.surrogate_stats if backend == "cpp" else torch.ops.dynkernels.surrogate_stats_triton
    for region in (True, False):
        args = _stats_args(device, region=region)
        args = (args[0].requires_grad_(), *args[1:])
        torch.library.opcheck(op, args)


def test_compile_fullgraph():
    logits, label = _problem(c=5, seed=13)
    x = logits.float()
    for metric in ("miou", "fwiou", "biou", "bf1"):
        fn = lambda v, t, m=metric: ops.surrogate_seg_loss(v, t, metric=m)  # noqa: E731
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, label), fn(x, label))


def test_cpp_sums_do_not_depend_on_threads():
    logits, label = _problem(n=3, c=9, h=97, w=89, seed=14)
    x = logits.float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.surrogate_seg_loss(x, label, backend="cpp")
        torch.set_num_threads(max(2, threads))
        many = ops.surrogate_seg_loss(x, label, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ------------------------------------------------ bad inputs

_L, _T = _problem(c=5)
BAD = [
    ("metric", lambda: ops.surrogate_seg_loss(_L, _T, metric="dice"), ValueError, "metric"),
    ("theta length", lambda: ops.surrogate_seg_loss(_L, _T, theta=[0.5] * 5), ValueError, "4M - 2"),
    ("theta curves", lambda: ops.surrogate_seg_loss(_L, _T, theta=[0.3, 0.3]), ValueError, "2 curve"),
    ("not monotone", lambda: ops.bezier_surrogate(_L, [0.5, 0.5, 0.4, 0.6, 0.8, 0.9]), ValueError, "monotone"),
    ("outside [0, 1]", lambda: ops.bezier_surrogate(_L, [1.2, 0.5]), ValueError, "monotone"),
    ("zero width", lambda: ops.bezier_surrogate(_L, [0.0, 0.2, 0.0, 0.3, 0.5, 0.5]), ValueError, "positive width"),
    ("shapes", lambda: ops.surrogate_seg_loss(_L, _T[:, :5]), ValueError, "target must be"),
    ("float labels", lambda: ops.surrogate_seg_loss(_L, _T.double()), TypeError, "class indices"),
    ("3-d logits", lambda: ops.surrogate_seg_loss(_L[0], _T), ValueError, "logits"),
    ("tolerance", lambda: ops.surrogate_seg_loss(_L, _T, metric="biou", boundary_tolerance=-1), ValueError, "tolerance"),
    ("bf1 kernel", lambda: ops.surrogate_seg_loss(_L, _T, metric="bf1", backend="cpp"), ValueError, "composite"),
]


@pytest.mark.parametrize("call,error,match", bad_input_params(BAD))
def test_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)


# ------------------------------------------------ the module and the search


def test_module_is_the_official_autosegloss():
    from dynkernels import nn as dnn

    logits, label = _problem(c=5, seed=15)
    for metric in ref.METRICS:
        loss = dnn.SurrogateSegLoss(metric, loss_weight=0.4)
        torch.testing.assert_close(loss(logits, label), 0.4 * official_loss(logits, label, _theta(metric), metric))
        assert metric in repr(loss)
    custom = random_curve(2, torch.Generator().manual_seed(3))
    theta = torch.cat([custom, _theta("miou")[6:]])
    torch.testing.assert_close(dnn.SurrogateSegLoss("miou", theta)(logits, label), official_loss(logits, label, theta, "miou"))


def official_ppo_round(mu_x, sigma, u, rewards, updates, lr, clip_eps):
    """One round of AutoLoss.search with the 'mu' baseline (u[0] = mu)."""
    from torch.distributions import Normal

    def log_prob(mu, x):
        normal = Normal(torch.zeros_like(mu), torch.ones_like(mu))
        alpha, beta = (-mu + 0.0) / sigma, (-mu + 1.0) / sigma
        down = (normal.cdf(beta) - normal.cdf(alpha)).log().view(1, -1)
        up = (1.0 / sigma).log() + normal.log_prob((x - mu) / sigma)
        return (up - down).where((x >= 0) & (x <= 1), torch.tensor(-float("inf"), dtype=x.dtype))

    mu_x = mu_x.clone().requires_grad_()
    opt = torch.optim.Adam([mu_x], lr=lr)
    adv = (rewards - rewards[0]).view(-1, 1)
    init = log_prob(mu_x.sigmoid(), u).detach()
    for _ in range(updates):
        d = (log_prob(mu_x.sigmoid(), u) - init).exp()
        loss = -1.0 * torch.min(d * adv, d.clamp(1 - clip_eps, 1 + clip_eps) * adv).mean(dim=0).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mu_x.detach().sigmoid()


def test_search_follows_the_official_ppo_round_and_improves_the_reward():
    from dynkernels import nn as dnn

    target = torch.tensor([0.1, 0.6, 0.4, 0.8, 0.7, 0.9], dtype=torch.float64)  # a curve to find

    def reward(points):
        assert points.shape == (6,)
        ops.bezier_surrogate(torch.linspace(0, 1, 5, dtype=torch.float64), points)  # monotone: accepted
        return -float((points - target).abs().sum())

    g = torch.Generator().manual_seed(0)
    result = dnn.search_surrogate(reward, metric="macc", rounds=1, samples=8, updates=5, generator=g)
    round0 = result.history[0]
    mu0 = torch.tensor([0.25, 0.25, 1 / 3, 1 / 3, 0.5, 0.5], dtype=torch.float64)
    assert torch.allclose(round0["control_points"][0], dnn.monotone_control_points(mu0.view(1, -1), 1)[0])
    torch.testing.assert_close(round0["control_points"][0], torch.tensor([0.25, 0.25, 0.5, 0.5, 0.75, 0.75], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    u = torch.cat([mu0.view(1, -1), dnn.TruncatedNormal(mu0, torch.full_like(mu0, 0.2)).sample(7, g)])
    want = official_ppo_round(torch.logit(mu0), torch.full_like(mu0, 0.2), u, round0["rewards"], 5, 0.2, 0.2)
    torch.testing.assert_close(result.mu, want, rtol=1e-12, atol=1e-12)
    longer = dnn.search_surrogate(reward, metric="macc", rounds=6, samples=12, updates=20, generator=g)
    assert reward(longer.theta) > reward(round0["control_points"][0])
    with pytest.raises(ValueError, match="baseline"):
        dnn.search_surrogate(reward, baseline="median")
