"""Benchmark cases of early exit (issue 16):

* ``crop_patches`` at B = 64 and 256, 3 x 224 x 224, P = 96 (NCHW and
  channels-last), against GFNet's per-sample ``get_patch`` loop (written
  from its code), kornia's ``crop_by_indices`` (where installed) and the
  floor the issue names: a copy of the output (``clone``). Floor bytes: the
  windows read and the patches written once.
* The MSDNet / GFNet budget calibration on 200k x 5 confidences and the
  budgeted evaluation on 50k x 5, against the official loops
  (``dynamic_find_threshold`` / ``dynamic_evaluate``, transcribed in
  dynkernels.reference.early_exit).
* Early-exit inference of a GFNet with timm MobileNetV3-small encoders
  (random weights, eval, float32, T = 3, P = 96, 1000 classes) at B = 64 for
  budgets q in {0.5, 1, 1.5} of the sweep (thresholds calibrated on 128
  other images): ``predict`` (compaction after every step) against the
  official full-T path (every step for every sample, the per-sample crop
  loop), our full-T path (``simulate``), and the ideal: each step run on
  only the n_k samples that reach it, with no exit bookkeeping at all
  (``sum_k t_k(n_k)``, timed side by side).
"""

from __future__ import annotations

import functools

import torch

from .. import nn as dnn
from .. import ops
from ..reference import early_exit as ref
from .base import Case as _case
from .base import Impl as _impl
from .base import have

FAMILY = "early_exit"


def _windows(actions, h, w, p):
    return torch.floor(actions[:, 0] * (h - p)).long(), torch.floor(actions[:, 1] * (w - p)).long()


def _kornia_boxes(actions, h, w, p):
    y, x = _windows(actions, h, w, p)
    x1, y1 = x + p - 1, y + p - 1
    return torch.stack([torch.stack(c, 1) for c in ((x, y), (x1, y), (x1, y1), (x, y1))], 1).float()


def crop_setup(batch, size, p, channels_last, device):
    g = torch.Generator().manual_seed(batch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=fmt)
    actions = torch.rand(batch, 2, generator=g).to(device)
    ours = lambda: ops.crop_patches(images, actions, p, check_values=False)  # noqa: E731
    official = lambda: ref.crop_patches(images, actions, p)  # noqa: E731
    out = ours()
    if not torch.equal(out, official()):
        raise AssertionError("crop_patches disagrees with GFNet's get_patch loop; refusing to time it")
    impls = [_impl("dynkernels", ours, "kernel"), _impl("GFNet get_patch loop", official, "anchor", True)]
    if have("kornia"):
        from kornia.geometry.transform import crop_by_indices

        boxes = _kornia_boxes(actions, size, size, p)
        kornia = lambda: crop_by_indices(images, boxes, size=(p, p))  # noqa: E731
        impls.append(_impl("kornia crop_by_indices", kornia, "anchor", torch.equal(kornia(), out)))
    impls.append(_impl("copy of the output (floor)", lambda: out.clone(), "anchor", None, "the issue's floor"))
    return impls


def calibration_setup(n, stages, q, device):
    g = torch.Generator().manual_seed(n)
    confidence = torch.rand(stages, n, generator=g)
    proportions = ops.budget_proportions(q, stages)
    ours = lambda: ops.budget_thresholds(confidence.to(device), proportions)  # noqa: E731
    official = lambda: ref.budget_thresholds(confidence, proportions)  # noqa: E731
    if not torch.equal(ours().cpu(), official()):
        raise AssertionError("budget_thresholds disagrees with the official loop; refusing to time it")
    return [_impl("dynkernels", ours, "kernel"), _impl("official dynamic_find_threshold", official, "anchor", True)]


def evaluation_setup(n, stages, q, device):
    g = torch.Generator().manual_seed(n + 1)
    confidence = torch.rand(stages, n, generator=g)
    predictions, targets = torch.randint(0, 1000, (stages, n), generator=g), torch.randint(0, 1000, (n,), generator=g)
    thresholds = ops.budget_thresholds(torch.rand(stages, n, generator=g), q=q)
    costs = torch.arange(1.0, stages + 1)
    on = [t.to(device) for t in (confidence, predictions, targets, thresholds)]
    ours = lambda: ops.budget_evaluate(*on, costs)  # noqa: E731
    official = lambda: ref.budget_evaluate(confidence, predictions, targets, thresholds, costs)  # noqa: E731
    acc, cost = ours()
    want_acc, want_cost = official()
    if abs(acc.item() - want_acc) > 1e-9 or abs(cost.item() - want_cost) > 1e-9:
        raise AssertionError("budget_evaluate disagrees with the official loop; refusing to time it")
    return [_impl("dynkernels", ours, "kernel"), _impl("official dynamic_evaluate", official, "anchor", True)]


@functools.lru_cache(maxsize=2)
def _gfnet(batch, device):
    torch.manual_seed(0)
    model = dnn.GFNet.from_timm("mobilenetv3_small_100", num_classes=1000).to(device).eval()
    g = torch.Generator().manual_seed(batch)
    calibration = [torch.randn(batch, 3, 224, 224, generator=g).to(device) for _ in range(2)]
    images = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    return model, calibration, images


def _official_full_t(model, images, thresholds):
    """The official evaluation: every step for every sample, the per-sample crop loop, exits afterwards."""
    backend = model.backend
    model.backend = "reference"
    try:
        probs = model.simulate(images)
    finally:
        model.backend = backend
    return ops.exit_stage(probs.amax(2), thresholds), probs


def _ideal(model, images, counts):
    """Each step on the first n_k samples only (the states computed once from
    a full rollout), with no softmax, threshold or compaction: sum_k t_k(n_k)."""
    with torch.no_grad():
        feature, fmap = model._glance(images, model.eval_glance_mode)
        _, cls_state = model._first(feature, True)
        states, hidden = [(fmap, cls_state, None)], None
        for k in range(1, model.steps):
            action, hidden, _ = model._act(model.policy, fmap, hidden, False)
            feature, fmap = model._focus(images, action)
            _, cls_state = model.classifier.step(feature, k, cls_state)
            states.append((fmap, cls_state, hidden))
    dim = model.classifier.state_dim

    @torch.no_grad()
    def run():
        feature, _ = model._glance(images, model.eval_glance_mode)
        model._first(feature, True)
        for k in range(1, model.steps):
            n = counts[k]
            if n == 0:
                break
            fmap, cls_state, hidden = states[k - 1]
            action, _, _ = model._act(model.policy, fmap[:n], None if hidden is None else hidden[:, :n], False)
            feature, _ = model._focus(images[:n], action)
            model.classifier.step(feature, k, cls_state.narrow(dim, 0, n))

    return run


def gfnet_setup(batch, q, device):
    model, calibration, images = _gfnet(batch, device)
    thresholds = model.calibrate(calibration, q=q)
    result = model.predict(images, thresholds)
    official_stage, probs = _official_full_t(model, images, thresholds)
    # equal exits, except where a confidence lies within float32 rounding of its threshold (the compacted
    # batches may round differently in the last place)
    confidence = probs.amax(2)
    differ = result.exit_step != official_stage
    if differ.any():
        first = torch.minimum(result.exit_step, official_stage).clamp(min=0)
        gap = (confidence.gather(0, first[None])[0] - thresholds[first]).abs()
        if (gap[differ] > 1e-6 * thresholds[first][differ].abs()).any():
            raise AssertionError("GFNet.predict's exits disagree with the full-T evaluation; refusing to time it")
    counts = result.active.tolist()
    note = f"n_k = {counts}"
    return [
        _impl("dynkernels predict", lambda: model.predict(images, thresholds), "kernel", note=note),
        _impl("official full-T", lambda: _official_full_t(model, images, thresholds), "anchor", True),
        _impl("dynkernels full-T", lambda: model.simulate(images), "variant", True),
        _impl("ideal sum_k t_k(n_k)", _ideal(model, images, counts), "anchor", None, "no exit bookkeeping"),
    ]


def cases(size: str, device: str) -> list:
    out = []
    n_cal, n_eval = (2000, 1000) if size == "quick" else (200_000, 50_000)
    out.append(
        _case(
            FAMILY,
            "budget_thresholds",
            f"N={n_cal} T=5 q=1",
            lambda: calibration_setup(n_cal, 5, 1.0, device),
            dict(N=n_cal, T=5, q=1.0),
            ("dynkernels", "official dynamic_find_threshold"),
            floor_bytes=4 * 5 * n_cal,
        )
    )
    out.append(
        _case(
            FAMILY,
            "budget_evaluate",
            f"N={n_eval} T=5 q=1",
            lambda: evaluation_setup(n_eval, 5, 1.0, device),
            dict(N=n_eval, T=5, q=1.0),
            ("dynkernels", "official dynamic_evaluate"),
            floor_bytes=(4 + 8) * 5 * n_eval + 8 * n_eval,
        )
    )
    crops = (
        [(4, 32, 12, False)] if size == "quick" else [(64, 224, 96, False), (256, 224, 96, False), (256, 224, 96, True)]
    )
    for b, s, p, cl in crops:
        names = ("dynkernels", "GFNet get_patch loop") + (("kornia crop_by_indices",) if have("kornia") else ())
        out.append(
            _case(
                FAMILY,
                "crop_patches",
                f"B={b} 3x{s}x{s} P={p}" + (" channels-last" if cl else ""),
                lambda a=(b, s, p, cl): crop_setup(*a, device),
                dict(B=b, C=3, H=s, W=s, P=p, channels_last=cl),
                names + ("copy of the output (floor)",),
                floor_bytes=2 * 4 * b * 3 * p * p,
            )
        )
    if have("timm") and size != "quick":
        qs = (0.5, 1.0, 1.5) if size == "default" else (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
        for q in qs:
            out.append(
                _case(
                    FAMILY,
                    "GFNet MobileNetV3-S inference",
                    f"B=64 T=3 P=96 q={q}",
                    lambda q=q: gfnet_setup(64, q, device),
                    dict(B=64, T=3, P=96, q=q, encoder="mobilenetv3_small_100"),
                    ("dynkernels predict", "official full-T", "dynkernels full-T", "ideal sum_k t_k(n_k)"),
                )
            )
    return out
