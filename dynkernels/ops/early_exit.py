"""Early exit (issue 16), part 1: MSDNet / RANet / GFNet's budgeted
thresholds, vectorised.

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
  "inf"`` gives +inf / -inf instead of 1e8 / -1e8. One sort per stage on the
  device, no loop over samples.
* ``exit_stage(confidence, thresholds) -> (N,)``: the first stage each
  sample's confidence reaches, -1 where none does (only possible when the
  last threshold is not the sentinel; the official evaluation skips such a
  sample).
* ``expected_cost(stage, stage_costs) -> ()``: ``sum_k (n_k / N) cost_k``
  in float64 (samples at -1 cost nothing, as the official loop counts them).
Compositions of torch ops; no kernel of their own."""

from __future__ import annotations

import torch

from ..reference import early_exit as ref
from ._validation import check_int, check_real, check_tensor

__all__ = ["budget_proportions", "budget_thresholds", "exit_stage", "expected_cost"]

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
    wanted = torch.floor(n * values).to(torch.int64).to(device)  # the official float product, floored
    thresholds = torch.full((stages,), high, dtype=confidence.dtype, device=device)
    out = torch.zeros(n, dtype=torch.bool, device=device)
    lowest = torch.tensor(float("-inf"), dtype=confidence.dtype, device=device)
    for k in range(stages - 1):
        ranked = torch.where(out, lowest, confidence[k]).sort(descending=True).values
        left = (~out).sum()
        ok = (wanted[k] >= 1) & (wanted[k] <= left)
        pick = ranked[(wanted[k] - 1).clamp(0, n - 1)]
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
    first = passed.to(torch.int8).argmax(dim=0)  # the first True (argmax returns the first maximum)
    return torch.where(passed.any(dim=0), first.to(torch.int64), -1)


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
