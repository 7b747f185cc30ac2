"""References of the early-exit family (issue 16): MSDNet's budgeted
thresholds as its code computes them (kalviny/MSDNet-PyTorch
``adaptive_inference.py``; RANet's and GFNet's ``inference.py`` use the same
scheme), loop by loop.

* Proportions for a budget q (MSDNet's ``p / 20``): ``exp(log(q) * [1..T])``
  normalised, in float32.
* Thresholds: all start at 1e8; for each stage k but the last, walk the
  samples by descending confidence at k and take the confidence of the
  ``floor(N * p_k)``-th one that no earlier stage let out (none: 1e8 stays);
  then every sample with confidence >= T_k is out. The last threshold is
  -1e8 (every remaining sample exits there).
* Evaluation: each sample exits at the first stage whose threshold its
  confidence reaches; the expected cost is ``sum_k (n_k / N) cost_k``.
* GFNet's focus patches (``utils.get_patch``): a loop over the batch, the
  window at ``floor(action * (S - P))`` read back with ``.item()``; the
  official code takes S from the height for both axes, here y uses H and x
  uses W (the same crop on square images).
* GFNet's glance (``utils.get_prime``): ``F.interpolate(images, [P, P],
  mode, align_corners=True)``.
* Compaction: the kept rows selected with a boolean mask; results written
  back row by row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def budget_proportions(q: float, stages: int) -> torch.Tensor:
    p = torch.full((1,), float(q), dtype=torch.float32)
    probs = torch.exp(torch.log(p) * torch.arange(1, stages + 1, dtype=torch.float32))
    return probs / probs.sum()


def budget_thresholds(confidence: torch.Tensor, proportions: torch.Tensor) -> torch.Tensor:
    """The official loop (confidence (T, N) on the CPU); thresholds in confidence's dtype."""
    stages, n = confidence.shape
    order = confidence.sort(dim=1, descending=True).indices
    filtered = torch.zeros(n)
    thresholds = torch.full((stages,), 1e8, dtype=confidence.dtype)
    for k in range(stages - 1):
        count = 0
        out_n = math.floor(n * proportions[k])  # in the proportions' dtype, as the official float32 product
        for i in range(n):
            idx = order[k][i]
            if filtered[idx] == 0:
                count += 1
                if count == out_n:
                    thresholds[k] = confidence[k][idx]
                    break
        filtered.add_(confidence[k].ge(thresholds[k]).type_as(filtered))
    thresholds[stages - 1] = -1e8
    return thresholds


def exit_stage(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Per sample the first stage k with confidence >= T_k, or -1 (the official loop skips it)."""
    stages, n = confidence.shape
    out = torch.full((n,), -1, dtype=torch.int64)
    for i in range(n):
        for k in range(stages):
            if confidence[k][i].item() >= thresholds[k]:
                out[i] = k
                break
    return out


def expected_cost(stage: torch.Tensor, stage_costs) -> torch.Tensor:
    n = stage.numel()
    total = 0.0
    for k, cost in enumerate(stage_costs):
        total += float((stage == k).sum()) / n * float(cost)
    return torch.tensor(total, dtype=torch.float64)


def crop_patches(images: torch.Tensor, actions: torch.Tensor, patch_size: int) -> torch.Tensor:
    """get_patch's loop (differentiable in the images through the slices)."""
    _, _, h, w = images.shape
    ys = torch.floor(actions[:, 0] * (h - patch_size)).int()
    xs = torch.floor(actions[:, 1] * (w - patch_size)).int()
    patches = []
    for i in range(images.shape[0]):
        y, x = ys[i].item(), xs[i].item()
        patches.append(images[i : i + 1, :, y : y + patch_size, x : x + patch_size])
    return torch.cat(patches, 0)


def glance(images: torch.Tensor, size, mode: str = "bicubic") -> torch.Tensor:
    size = [size, size] if isinstance(size, int) else list(size)
    return F.interpolate(images, size=size, mode=mode, align_corners=True)


def compact_active(keep: torch.Tensor, *tensors, dims=0):
    dims = [dims] * len(tensors) if isinstance(dims, int) else list(dims)
    index = torch.arange(keep.numel(), device=keep.device)[keep]
    out = [None if t is None else t.movedim(d, 0)[keep].movedim(0, d) for t, d in zip(tensors, dims, strict=True)]
    return (index, *out)


def expand_results(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    result = out.clone()
    for j in range(index.numel()):
        result.select(dim, int(index[j])).copy_(values.select(dim, j))
    return result


def budget_evaluate(confidence, predictions, targets, thresholds, stage_costs):
    """dynamic_evaluate's loop: per sample the first stage it reaches; (accuracy in %, expected cost)."""
    stages, n = confidence.shape
    correct, exits = 0, [0] * stages
    for i in range(n):
        for k in range(stages):
            if confidence[k][i].item() >= thresholds[k]:
                if int(targets[i].item()) == int(predictions[k][i].item()):
                    correct += 1
                exits[k] += 1
                break
    cost = sum(exits[k] / n * float(stage_costs[k]) for k in range(stages))
    return correct * 100.0 / n, cost
