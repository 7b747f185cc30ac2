"""Early exit, part 1: the vectorised MSDNet budget calibration against the
official loops (dynkernels.reference.early_exit transcribes
adaptive_inference.py's dynamic_find_threshold / dynamic_evaluate), with
tied confidences, every budget of MSDNet's sweep, N = 1 and T = 1."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_clear_error, bad_input_params

from dynkernels import ops
from dynkernels.reference import early_exit as ref


def _confidence(stages, n, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(stages, n, generator=g)
    return torch.round(c * 10) / 10 if ties else c


@pytest.mark.parametrize("stages,n", [(5, 500), (3, 37), (4, 1), (1, 9)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [1, 7, 20, 39])
def test_thresholds_and_exits_are_bit_identical_to_the_official_loops(stages, n, ties, p):
    confidence = _confidence(stages, n, ties, seed=p)
    proportions = ops.budget_proportions(p / 20, stages)
    torch.testing.assert_close(proportions, ref.budget_proportions(p / 20, stages), rtol=0, atol=0)
    ours = ops.budget_thresholds(confidence, proportions)
    theirs = ref.budget_thresholds(confidence, proportions)
    assert torch.equal(ours, theirs)
    assert torch.equal(ops.budget_thresholds(confidence, q=p / 20), theirs)
    stage = ops.exit_stage(confidence, ours)
    assert torch.equal(stage, ref.exit_stage(confidence, theirs))
    assert (stage >= 0).all()  # the last threshold lets everyone out
    costs = torch.arange(1.0, stages + 1)
    torch.testing.assert_close(ops.expected_cost(stage, costs), ref.expected_cost(stage, costs), rtol=1e-15, atol=0)


def test_sentinels_and_samples_that_never_exit():
    confidence = _confidence(3, 50, True)
    t = ops.budget_thresholds(confidence, q=0.5, sentinel="inf")
    assert t[-1] == float("-inf")
    official = ref.budget_thresholds(confidence, ops.budget_proportions(0.5, 3))
    assert torch.equal(t[:-1][t[:-1] < 1e8], official[:-1][official[:-1] < 1e8])
    high = torch.tensor([2.0, 2.0, 0.5])  # nothing passes the first two; half the rest never exits
    stage = ops.exit_stage(confidence, high)
    assert torch.equal(stage, ref.exit_stage(confidence, high)) and (stage == -1).any()
    cost = ops.expected_cost(stage, [1.0, 2.0, 3.0])
    torch.testing.assert_close(cost, ref.expected_cost(stage, [1.0, 2.0, 3.0]), rtol=1e-15, atol=0)


def test_a_proportion_of_zero_keeps_the_official_1e8():
    confidence = _confidence(3, 10, False)
    t = ops.budget_thresholds(confidence, torch.tensor([0.0, 0.5, 0.5]))
    assert t[0] == 1e8 and torch.equal(t, ref.budget_thresholds(confidence, torch.tensor([0.0, 0.5, 0.5])))


BAD = [
    ("sum", lambda: ops.budget_thresholds(torch.rand(2, 5), torch.tensor([0.5, 0.6])), ValueError, "sum to 1"),
    ("length", lambda: ops.budget_thresholds(torch.rand(2, 5), torch.tensor([1.0])), ValueError, "proportions"),
    ("both", lambda: ops.budget_thresholds(torch.rand(2, 5), torch.tensor([0.5, 0.5]), q=0.5), ValueError, "not both"),
    ("q", lambda: ops.budget_proportions(0.0, 3), ValueError, "q must be"),
    ("thresholds", lambda: ops.exit_stage(torch.rand(3, 4), torch.zeros(2)), ValueError, "thresholds must be"),
    ("sentinel", lambda: ops.budget_thresholds(torch.rand(2, 5), q=0.5, sentinel="big"), ValueError, "sentinel"),
    ("confidence", lambda: ops.exit_stage(torch.rand(4), torch.zeros(4)), ValueError, "confidence must be"),
]


@pytest.mark.parametrize("call,error,match", bad_input_params(BAD))
def test_bad_inputs_give_clear_errors(call, error, match):
    assert_clear_error(call, error, match)


@pytest.mark.parametrize("ties", [False, True])
def test_budget_evaluate_equals_dynamic_evaluate(ties):
    confidence = _confidence(4, 300, ties, seed=2)
    g = torch.Generator().manual_seed(3)
    predictions, targets = torch.randint(0, 3, (4, 300), generator=g), torch.randint(0, 3, (300,), generator=g)
    costs = [1.0, 2.5, 4.0, 7.0]
    for thresholds in (ops.budget_thresholds(confidence, q=0.7), torch.tensor([0.9, 0.8, 0.7, 0.95])):
        acc, cost = ops.budget_evaluate(confidence, predictions, targets, thresholds, costs)
        want_acc, want_cost = ref.budget_evaluate(confidence, predictions, targets, thresholds, costs)
        assert acc.item() == pytest.approx(want_acc, rel=1e-15) and cost.item() == pytest.approx(want_cost, rel=1e-15)
    with pytest.raises(ValueError, match="predictions must be"):
        ops.budget_evaluate(confidence, predictions[:2], targets, thresholds, costs)
