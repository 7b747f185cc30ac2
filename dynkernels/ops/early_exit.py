"""Early exit (issue 16): MSDNet / RANet / GFNet's budgeted thresholds,
GFNet's glance and focus patches, and the compaction a real early exit needs.

* ``budget_proportions(q, stages) -> (T,)``: the exit proportions for budget
  q (MSDNet sweeps q = p / 20, p = 1..39): ``q^k`` for k = 1..T, normalised,
  in float32 as the official code.
* ``budget_thresholds(confidence (T, N), proportions (T,) | q=...) -> (T,)``:
  the MSDNet calibration. For each stage k but the last, T_k is the
  ``floor(N p_k)``-th largest confidence at k among the samples no earlier
  stage let out (1e8 when that count is 0 or exceeds what is left, as the
  official loop leaves it); every sample reaching T_k is then out. The last
  threshold is -1e8. ``floor(N p_k)`` is computed in the proportions' dtype
  (the official code multiplies by its float32 proportions), and the
  thresholds are confidence values, in confidence's dtype: bit-identical to
  the official loop whatever its sort does with ties (tested). ``sentinel=
  "inf"`` gives +inf / -inf instead of 1e8 / -1e8. One selection
  (``kthvalue``) per stage on the device, no loop over samples, no sync.
* ``exit_stage(confidence, thresholds) -> (N,)``: the first stage each
  sample's confidence reaches, -1 where none does (only possible when the
  last threshold is not the sentinel; the official evaluation skips such a
  sample).
* ``expected_cost(stage, stage_costs) -> ()``: ``sum_k (n_k / N) cost_k``
  in float64 (samples at -1 cost nothing, as the official loop counts them).
Compositions of torch ops; no kernel of their own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ..reference import early_exit as ref
from ._registration import register_kernel_pairs
from ._validation import check_int, check_real, check_same_device, check_tensor

__all__ = [
    "budget_evaluate",
    "budget_proportions",
    "budget_thresholds",
    "compact_active",
    "crop_patches",
    "exit_stage",
    "expand_results",
    "expected_cost",
    "glance",
]

FAMILY = "early_exit"
_KERNELS = ("reference", "cpp", "triton")
register_op(
    "crop_patches",
    FAMILY,
    _KERNELS,
    reference=ref.crop_patches,
    differentiable=_KERNELS,
    auto={"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")},
)

_SENTINELS = {"1e8": (1e8, -1e8), "inf": (float("inf"), float("-inf"))}


def budget_proportions(q: float, stages: int) -> torch.Tensor:
    """See the module docstring."""
    q = check_real("q", q)
    if not q > 0:
        raise ValueError(f"q must be > 0, got {q}")
    return ref.budget_proportions(q, check_int("stages", stages, 1))


def _check_confidence(confidence) -> torch.Tensor:
    confidence = check_tensor("confidence", confidence)
    if confidence.dim() != 2 or not confidence.is_floating_point() or confidence.shape[1] == 0:
        raise ValueError(f"confidence must be a floating (T, N) tensor with N >= 1, got {tuple(confidence.shape)}")
    return confidence


def budget_thresholds(
    confidence: torch.Tensor, proportions: torch.Tensor | None = None, *, q: float | None = None, sentinel: str = "1e8"
) -> torch.Tensor:
    """See the module docstring."""
    confidence = _check_confidence(confidence)
    stages, n = confidence.shape
    if (proportions is None) == (q is None):
        raise ValueError("give proportions or q, not both or neither")
    if sentinel not in _SENTINELS:
        raise ValueError(f"sentinel must be one of {sorted(_SENTINELS)}, got {sentinel!r}")
    if proportions is None:
        proportions = budget_proportions(q, stages)
    proportions = check_tensor("proportions", proportions)
    if proportions.shape != (stages,) or not proportions.is_floating_point():
        raise ValueError(f"proportions must be a floating (T = {stages},) tensor, got {tuple(proportions.shape)}")
    values = proportions.detach().cpu()  # T numbers, read once (calibration is offline)
    if (values < 0).any() or abs(float(values.double().sum()) - 1.0) > 1e-5:
        raise ValueError(f"proportions must be >= 0 and sum to 1, got {values.tolist()}")
    high, low = _SENTINELS[sentinel]
    device = confidence.device
    wanted = torch.floor(n * values).to(torch.int64).tolist()  # the official float product, floored (on the CPU copy)
    thresholds = torch.full((stages,), high, dtype=confidence.dtype, device=device)
    out = torch.zeros(n, dtype=torch.bool, device=device)
    lowest = torch.tensor(float("-inf"), dtype=confidence.dtype, device=device)
    for k in range(stages - 1):
        if 1 <= wanted[k] <= n:
            # the wanted-th largest among those still in: the (n - wanted + 1)-th smallest once the others
            # are -inf (a selection, not a sort); more wanted than are left keeps the sentinel, as the loop
            pick = torch.where(out, lowest, confidence[k]).kthvalue(n - wanted[k] + 1).values
            ok = (~out).sum() >= wanted[k]
            thresholds[k] = torch.where(ok, pick, thresholds[k])
        out = out | (confidence[k] >= thresholds[k])
    thresholds[stages - 1] = low
    return thresholds


def exit_stage(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """See the module docstring."""
    confidence = _check_confidence(confidence)
    thresholds = check_tensor("thresholds", thresholds)
    if thresholds.shape != (confidence.shape[0],):
        raise ValueError(f"thresholds must be (T = {confidence.shape[0]},), got {tuple(thresholds.shape)}")
    passed = confidence >= thresholds.to(confidence.device, confidence.dtype)[:, None]
    stage = torch.full(passed.shape[1:], -1, dtype=torch.int64, device=passed.device)
    for k in range(passed.shape[0] - 1, -1, -1):  # T elementwise passes (an argmax over dim 0 is 50x slower)
        stage = torch.where(passed[k], k, stage)
    return stage


def expected_cost(stage: torch.Tensor, stage_costs) -> torch.Tensor:
    """See the module docstring."""
    stage = check_tensor("stage", stage)
    costs = torch.as_tensor(stage_costs, dtype=torch.float64, device=stage.device)
    if stage.dim() != 1 or stage.numel() == 0 or costs.dim() != 1:
        raise ValueError(f"stage must be (N,) with N >= 1 and stage_costs (T,), got {tuple(stage.shape)}")
    t = costs.numel()
    bins = torch.where((stage >= 0) & (stage < t), stage, t)  # -1 (no exit) into a spare bin: no mask selection
    counts = torch.bincount(bins, minlength=t + 1)[:t].to(torch.float64)
    return (counts / stage.numel() * costs).sum()


def _check_values(actions: torch.Tensor, index: torch.Tensor | None, images: int, check) -> None:
    if check is False or torch.compiler.is_compiling():
        return
    if check not in (True, "sync"):
        raise ValueError(f"check_values must be True, 'sync' or False, got {check!r}")
    inside = ((actions >= 0) & (actions <= 1)).all()  # False for a NaN
    if index is not None and index.numel():
        inside_index = ((index >= 0) & (index < images)).all()
    else:
        inside_index = None
    if actions.device.type == "cuda" and check is True:
        valid = inside if inside_index is None else inside & inside_index
        torch._assert_async(valid, f"actions must lie in [0, 1] and index in [0, {images})")
        return
    if not bool(inside):
        raise ValueError(
            f"actions must lie in [0, 1] (no NaN), got values in [{float(actions.min())}, {float(actions.max())}]"
        )
    if inside_index is not None and not bool(inside_index):
        raise IndexError(f"index must lie in [0, {images}), got values in [{int(index.min())}, {int(index.max())}]")


def crop_patches(
    images: torch.Tensor,
    actions: torch.Tensor,
    patch_size: int,
    *,
    index: torch.Tensor | None = None,
    check_values: bool | str = True,
    backend=None,
) -> torch.Tensor:
    """See the module docstring."""
    images, actions = check_tensor("images", images), check_tensor("actions", actions)
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if index is not None:
        index = check_tensor("index", index)
        if index.dtype != torch.int64 or index.dim() != 1:
            raise ValueError(f"index must be a (n,) int64 tensor, got {index.dtype} {tuple(index.shape)}")
        check_same_device(images=images, index=index)
        if torch.is_grad_enabled() and images.requires_grad:
            raise ValueError(
                "crop_patches(index=...) has no gradient (it is for inference); crop images[index] to train"
            )
    n = b if index is None else index.shape[0]
    if actions.shape != (n, 2) or not actions.is_floating_point():
        raise ValueError(f"actions must be a floating ({n}, 2) tensor, got {actions.dtype} {tuple(actions.shape)}")
    check_same_device(images=images, actions=actions)
    patch_size = check_int("patch_size", patch_size, 1)
    if patch_size > min(h, w):
        raise ValueError(f"patch_size must be at most min(H, W) = {min(h, w)}, got {patch_size}")
    _check_values(actions, index, b, check_values)
    actions = actions.detach()  # not differentiable (GFNet learns them by PPO)
    chosen = resolve("crop_patches", images.device, backend)
    if chosen == "cpp":
        return torch.ops.dynkernels.crop_patches(images, actions, index, patch_size)
    if chosen == "triton":
        return torch.ops.dynkernels.crop_patches_triton(images, actions, index, patch_size)
    if index is not None:
        images = images.index_select(0, index)
    return ref.crop_patches(images, actions, patch_size)


def _channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _like_layout(src: torch.Tensor, shape) -> torch.Tensor:
    fmt = torch.channels_last if _channels_last(src) else torch.contiguous_format
    return torch.empty(shape, dtype=src.dtype, device=src.device, memory_format=fmt)


@torch.library.custom_op("dynkernels::crop_patches_triton", mutates_args=())
def _crop_triton(
    images: torch.Tensor, actions: torch.Tensor, index: torch.Tensor | None, patch_size: int
) -> torch.Tensor:
    return family_kernels(FAMILY).crop_patches(images, actions, index, patch_size)


@torch.library.custom_op("dynkernels::crop_patches_backward_triton", mutates_args=())
def _crop_backward_triton(grad: torch.Tensor, actions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return family_kernels(FAMILY).crop_patches_backward(grad, actions, height, width)


def _fake_crop(images, actions, index, patch_size):
    return _like_layout(images, (actions.shape[0], images.shape[1], patch_size, patch_size))


def _fake_crop_backward(grad, actions, height, width):
    return _like_layout(grad, (grad.shape[0], grad.shape[1], height, width))


def _crop_setup(ctx, inputs, output):
    images, actions, index, patch_size = inputs
    ctx.save_for_backward(actions)
    ctx.size = (images.shape[2], images.shape[3])
    ctx.indexed = index is not None


def _crop_backward(ctx, backward_op, grad):
    if ctx.indexed:
        raise RuntimeError("crop_patches(index=...) has no gradient")
    (actions,) = ctx.saved_tensors
    return backward_op(grad, actions, *ctx.size), None, None, None


def _crop_double_setup(ctx, inputs, output):
    grad, actions, _, _ = inputs
    ctx.save_for_backward(actions)
    ctx.patch_size = grad.shape[2]


def _crop_double_backward(ctx, forward_op, grad):
    (actions,) = ctx.saved_tensors
    return forward_op(grad, actions, None, ctx.patch_size), None, None, None


register_kernel_pairs(
    ([("dynkernels::crop_patches", "dynkernels::crop_patches_backward")] if has_extension() else [])
    + [("dynkernels::crop_patches_triton", "dynkernels::crop_patches_backward_triton")],
    fake=_fake_crop,
    fake_backward=_fake_crop_backward,
    setup_context=_crop_setup,
    backward=_crop_backward,
    double_backward=(_crop_double_setup, _crop_double_backward),
)

_GLANCE_MODES = ("bicubic", "bilinear")


def glance(images: torch.Tensor, size: int | Sequence[int], *, mode: str = "bicubic") -> torch.Tensor:
    """See the module docstring."""
    images = check_tensor("images", images)
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be floating (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if mode not in _GLANCE_MODES:
        raise ValueError(f"mode must be one of {_GLANCE_MODES}, got {mode!r}")
    size = [size, size] if isinstance(size, int) else list(size)
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size}")
    size = [check_int("size", s, 1) for s in size]
    return F.interpolate(images, size=size, mode=mode, align_corners=True)


def compact_active(keep: torch.Tensor, *tensors: torch.Tensor | None, dims: int | Sequence[int] = 0):
    """See the module docstring."""
    keep = check_tensor("keep", keep)
    if keep.dtype != torch.bool or keep.dim() != 1:
        raise ValueError(f"keep must be a (B,) bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    dims = [dims] * len(tensors) if isinstance(dims, int) else list(dims)
    if len(dims) != len(tensors):
        raise ValueError(f"dims must give one batch dim per tensor ({len(tensors)}), got {len(dims)}")
    for i, (t, d) in enumerate(zip(tensors, dims, strict=True)):
        if t is None:
            continue
        check_tensor(f"tensors[{i}]", t)
        if not -t.dim() <= d < t.dim() or t.shape[d] != keep.shape[0] or t.device != keep.device:
            raise ValueError(
                f"tensors[{i}] must have the batch ({keep.shape[0]}) at dim {d} and keep's device {keep.device}, "
                f"got {tuple(t.shape)} on {t.device}"
            )
    index = keep.nonzero().squeeze(1)  # the one host sync: the count of active rows
    return (index, *(None if t is None else t.index_select(d, index) for t, d in zip(tensors, dims, strict=True)))


def expand_results(
    out: torch.Tensor, index: torch.Tensor, values: torch.Tensor, *, dim: int = 0, inplace: bool = False
) -> torch.Tensor:
    """See the module docstring."""
    out, index, values = check_tensor("out", out), check_tensor("index", index), check_tensor("values", values)
    if index.dtype != torch.int64 or index.dim() != 1:
        raise ValueError(f"index must be a (n,) int64 tensor, got {index.dtype} {tuple(index.shape)}")
    if not -out.dim() <= dim < out.dim() or values.dim() != out.dim():
        raise ValueError(f"dim {dim} and values {tuple(values.shape)} do not fit out {tuple(out.shape)}")
    expected = list(out.shape)
    expected[dim] = index.numel()
    if list(values.shape) != expected:
        raise ValueError(f"values must have shape {tuple(expected)}, got {tuple(values.shape)}")
    check_same_device(out=out, index=index, values=values)
    if index.device.type == "cpu" and not torch.compiler.is_compiling() and index.numel():
        if not (index.min() >= 0 and index.max() < out.shape[dim]):
            raise IndexError(f"index must lie in [0, {out.shape[dim]})")
    values = values.to(out.dtype)
    return out.index_copy_(dim, index, values) if inplace else out.index_copy(dim, index, values)


def budget_evaluate(
    confidence: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor, stage_costs
) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring."""
    stage = exit_stage(confidence, thresholds)
    predictions, targets = check_tensor("predictions", predictions), check_tensor("targets", targets)
    if predictions.shape != confidence.shape or targets.shape != confidence.shape[1:]:
        raise ValueError(
            f"predictions must be (T, N) = {tuple(confidence.shape)} and targets (N,), "
            f"got {tuple(predictions.shape)} and {tuple(targets.shape)}"
        )
    at_exit = predictions.gather(0, stage.clamp(min=0)[None])[0]
    correct = ((at_exit == targets) & (stage >= 0)).sum(dtype=torch.float64)
    return correct * 100.0 / stage.numel(), expected_cost(stage, stage_costs)
