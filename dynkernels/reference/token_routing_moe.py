"""References of the mixture-of-experts routing ops (issue 15), in plain
PyTorch, written the way the public formulations compute them: the router as
softmax + top-k (Switch, GShard, Mixtral), the dispatch positions by GShard's
one-hot cumulative sums (``mask * (cumsum(mask) - 1)``, the second choices
after all first choices), the experts as a Python loop over experts, the
combine as a weighted sum of each token's k expert outputs.

Assignments are taken slot-major: assignment ``a = j * T + t`` is token t's
j-th choice. Within an expert the rows are in that order (GShard's priority:
every first choice before any second choice, tokens in order), and with a
capacity C only the first C assignments of each expert are kept."""

from __future__ import annotations

import math

import torch

__all__ = [
    "load_balancing_loss",
    "moe_capacity",
    "moe_combine",
    "moe_dispatch",
    "moe_grouped_mm",
    "moe_route",
]


def moe_route(logits: torch.Tensor, k: int, *, normalize: bool = True):
    """softmax over the experts (in float32 for half types), the top k, and with
    ``normalize`` the k weights divided by their sum (GShard / Mixtral; Switch's
    top-1 is ``normalize=False``). Returns (weights (T, k) in logits' dtype,
    experts (T, k) int64), best first."""
    probs = torch.softmax(
        logits, dim=-1, dtype=torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else None
    )
    weights, experts = probs.topk(k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts


def moe_capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows per expert in capacity mode: ceil(capacity_factor * T * k / E)."""
    return math.ceil(capacity_factor * tokens * k / num_experts)


def moe_dispatch(x: torch.Tensor, experts: torch.Tensor, num_experts: int, *, capacity: int | None = None):
    """GShard's positions: per slot j, a one-hot (T, E) mask, each assignment's
    position in its expert = the cumulative count of earlier assignments
    (earlier slots first). Returns (x_sorted (R, d), source (R,), slot_row
    (T, k), offsets (E + 1,), counts (E,)) as :func:`dynkernels.ops.moe_dispatch`."""
    tokens, k = experts.shape
    mask = torch.nn.functional.one_hot(experts.t().reshape(-1), num_experts)  # (k T, E), slot-major
    position = (torch.cumsum(mask, dim=0) - 1).gather(1, experts.t().reshape(-1, 1))[:, 0]
    totals = mask.sum(dim=0)
    if capacity is None:
        offsets = torch.cat([totals.new_zeros(1), torch.cumsum(totals, 0)])
        rows = offsets[experts.t().reshape(-1)] + position
        kept = torch.ones_like(rows, dtype=torch.bool)
        n_rows, counts = tokens * k, totals
    else:
        offsets = torch.arange(num_experts + 1, device=x.device) * capacity
        kept = position < capacity
        rows = torch.where(kept, experts.t().reshape(-1) * capacity + position, -1)
        n_rows, counts = num_experts * capacity, totals.clamp(max=capacity)
    token_of = torch.arange(tokens, device=x.device).repeat(k)
    source = torch.full((n_rows,), -1, dtype=torch.int64, device=x.device)
    source[rows[kept]] = token_of[kept]
    slot_row = rows.reshape(k, tokens).t().contiguous()
    x_sorted = torch.where((source >= 0)[:, None], x[source.clamp(min=0)], 0)
    return x_sorted, source, slot_row, offsets, counts


def moe_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None = None):
    """The per-expert loop: rows offsets[e]..offsets[e+1] of x times w[e] (+ bias[e])."""
    out = x.new_zeros(x.shape[0], w.shape[2])
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            y = x[lo:hi] @ w[e]
            out[lo:hi] = y if bias is None else y + bias[e]
    return out


def moe_combine(y: torch.Tensor, slot_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y[slot_row[t, j]], dropped (-1) assignments adding nothing."""
    kept = slot_row >= 0
    rows = y[slot_row.clamp(min=0)] * (weights * kept)[..., None]
    return rows.sum(dim=1)


def load_balancing_loss(
    probs: torch.Tensor, experts: torch.Tensor, num_experts: int, *, first_choice_only: bool = False
) -> torch.Tensor:
    """Switch / Mixtral's auxiliary loss ``E * sum_e f_e P_e``: P_e the mean
    router probability of expert e over the tokens, f_e the assignments to e
    per token (all k choices, as Mixtral's; ``first_choice_only``: the first
    choice only, as Switch (k = 1) and GShard). Uniform routing gives k (or 1)."""
    chosen = experts[:, :1] if first_choice_only else experts
    f = torch.nn.functional.one_hot(chosen, num_experts).to(probs.dtype).sum(dim=(0, 1)) / experts.shape[0]
    return num_experts * (f * probs.mean(dim=0)).sum()
