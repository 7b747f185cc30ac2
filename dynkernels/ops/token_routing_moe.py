"""Mixture-of-experts routing (issue 15): route, dispatch, grouped GEMM,
combine and the load-balancing loss, for tokens x (T, d) and E experts.

* ``moe_route(logits (T, E), k, *, normalize=True) -> (weights, experts)``:
  softmax over the experts (float32 for half types), the top k (torch.topk's
  order: best first), with ``normalize`` the k weights divided by their sum
  (GShard, Mixtral; Switch's top-1: ``normalize=False``). A composition (T x E
  is small next to the experts); differentiable in the weights.
* ``moe_dispatch(x, experts (T, k), num_experts, *, capacity_factor=None,
  capacity=None) -> (x_sorted, plan)``: the T k assignments taken slot-major
  (every first choice before any second choice, tokens in order: GShard's
  priority) and grouped by expert. Dropless (default): ``x_sorted`` (T k, d),
  expert e's rows ``plan.offsets[e] .. plan.offsets[e + 1]``. With a capacity
  C (``capacity``, or ``ceil(capacity_factor * T * k / E)``): ``x_sorted``
  (E C, d), expert e's rows ``e C .. (e + 1) C``, its first C assignments kept
  (the rest dropped, deterministically) and unused rows zero. ``plan`` is a
  :class:`MoEPlan`: ``source`` (R,) each row's token (-1: padding),
  ``slot_row`` (T, k) each assignment's row (-1: dropped), ``offsets`` (E+1,),
  ``counts`` (E,) the rows kept per expert. Differentiable in x.
* ``moe_grouped_mm(x_sorted (R, d_in), w (E, d_in, d_out), offsets, bias=None)
  -> (R, d_out)``: each expert's segment times its weight (+ its bias
  (E, d_out)). offsets must start at 0, not decrease and end at R.
  Differentiable in x, w and bias.
* ``moe_combine(y_sorted, plan | slot_row, weights (T, k)) -> (T, d)``: each
  token's k expert outputs weighted and summed in slot order (a dropped
  assignment adds nothing). Differentiable in y and the weights.
* ``load_balancing_loss(probs, experts, num_experts, *, first_choice_only=False)``:
  Switch / Mixtral's ``E * sum_e f_e P_e`` (a composition).

Backends of dispatch, grouped GEMM and combine: "cpp" (auto on CPU: a counting
sort, threaded gathers, one BLAS GEMM per expert), "triton" (auto on CUDA: the
plan from the shared segment sort, no host sync; gathers, combine and a
grouped GEMM whose offsets stay on the device), "reference" (GShard's one-hot
cumsum positions, a Python loop over experts). Every gradient is taken
without atomics (deterministic)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ..reference import token_routing_moe as ref
from ._registration import dense_like, register_kernel_pairs
from ._validation import check_int, check_real, check_same_device, check_tensor
from .segment import segment_reduce, sort_segments

__all__ = [
    "MoEPlan",
    "load_balancing_loss",
    "moe_capacity",
    "moe_combine",
    "moe_dispatch",
    "moe_grouped_mm",
    "moe_route",
]

FAMILY = "token_routing"
_KERNELS = ("reference", "cpp", "triton")
_AUTO = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}
for _name in ("moe_dispatch", "moe_grouped_mm", "moe_combine"):
    register_op(_name, FAMILY, _KERNELS, reference=getattr(ref, _name), differentiable=_KERNELS, auto=_AUTO)


class MoEPlan(NamedTuple):
    """Where moe_dispatch put every assignment (see the module docstring)."""

    source: torch.Tensor
    slot_row: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor


def moe_route(logits: torch.Tensor, k: int, *, normalize: bool = True):
    """See the module docstring. Returns (weights (T, k), experts (T, k) int64)."""
    logits = check_tensor("logits", logits)
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating (T, E) tensor, got {logits.dtype} {tuple(logits.shape)}")
    k = check_int("k", k, 1)
    if k > logits.shape[1]:
        raise ValueError(f"k must be in [1, E = {logits.shape[1]}], got {k}")
    return ref.moe_route(logits, k, normalize=normalize)


def moe_capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows per expert in capacity mode: ceil(capacity_factor * T * k / E)."""
    capacity_factor = check_real("capacity_factor", capacity_factor)
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return ref.moe_capacity(tokens, k, num_experts, capacity_factor)


def _host_checks(t: torch.Tensor) -> bool:
    """Range checks that read values: on CPU tensors, outside torch.compile
    (there the C++ kernels check; on GPUs reading would sync, and the kernels
    read nothing outside the segments' bounds)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_experts(experts, tokens: int, num_experts: int) -> torch.Tensor:
    experts = check_tensor("experts", experts)
    if experts.dtype != torch.int64 or experts.dim() != 2 or experts.shape[0] != tokens:
        raise ValueError(f"experts must be (T = {tokens}, k) int64, got {experts.dtype} {tuple(experts.shape)}")
    if _host_checks(experts) and experts.numel() and not (experts.min() >= 0 and experts.max() < num_experts):
        raise IndexError(f"experts must lie in [0, num_experts = {num_experts})")
    return experts


def moe_dispatch(
    x: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    *,
    capacity_factor: float | None = None,
    capacity: int | None = None,
    backend=None,
):
    """See the module docstring. Returns (x_sorted, MoEPlan)."""
    x = check_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be (T, d), got {tuple(x.shape)}")
    num_experts = check_int("num_experts", num_experts, 1)
    experts = _check_experts(experts, x.shape[0], num_experts)
    check_same_device(x=x, experts=experts)
    if capacity is not None and capacity_factor is not None:
        raise ValueError("give capacity or capacity_factor, not both")
    if capacity_factor is not None:
        capacity = moe_capacity(x.shape[0], experts.shape[1], num_experts, capacity_factor)
    elif capacity is not None:
        capacity = check_int("capacity", capacity, 0)
    chosen = resolve("moe_dispatch", x.device, backend)
    if chosen == "reference":
        x_sorted, *plan = ref.moe_dispatch(x, experts, num_experts, capacity=capacity)
        return x_sorted, MoEPlan(*plan)
    cap = -1 if capacity is None else capacity
    if chosen == "cpp":
        plan = MoEPlan(*torch.ops.dynkernels.moe_plan(experts, num_experts, cap))
        return torch.ops.dynkernels.moe_gather(x, plan.source, plan.slot_row), plan
    plan = _plan_on_device(experts, num_experts, cap)
    return torch.ops.dynkernels.moe_gather_triton(x, plan.source, plan.slot_row), plan


def _plan_on_device(experts: torch.Tensor, num_experts: int, capacity: int) -> MoEPlan:
    """The plan from the shared segment sort (stable: slot-major order kept
    within each expert), device-side throughout; unique targets, so the
    scatters are deterministic (rows past a capacity go to a spare slot)."""
    tokens, k = experts.shape
    keys = experts.t().reshape(-1)
    seg = sort_segments(keys, num_experts)
    n = keys.numel()
    order = torch.arange(n, device=keys.device)
    token_of = seg.perm % tokens if tokens else seg.perm
    if capacity < 0:
        source, rows, offsets, counts = token_of, order, seg.offsets, seg.counts
    else:
        expert_of = keys[seg.perm]
        rank = order - seg.offsets[expert_of]
        kept = rank < capacity
        spare = num_experts * capacity
        rows = torch.where(kept, expert_of * capacity + rank, -1)
        source = torch.full((spare + 1,), -1, dtype=torch.int64, device=keys.device)
        source = source.scatter(0, torch.where(kept, rows, spare), token_of)[:spare]
        offsets = torch.arange(num_experts + 1, device=keys.device) * capacity
        counts = seg.counts.clamp(max=capacity)
    slot = torch.empty(n, dtype=torch.int64, device=keys.device).scatter(0, seg.perm, rows)
    return MoEPlan(source, slot.reshape(k, tokens).t().contiguous(), offsets, counts)


def moe_grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None = None, *, backend=None
):
    """See the module docstring."""
    x, w, offsets = check_tensor("x", x), check_tensor("w", w), check_tensor("offsets", offsets)
    if x.dim() != 2 or w.dim() != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(f"x must be (R, d_in) and w (E, d_in, d_out), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != w.dtype or not x.is_floating_point():
        raise TypeError(f"x and w must share a floating dtype, got {x.dtype} and {w.dtype}")
    if offsets.dtype != torch.int64 or offsets.shape != (w.shape[0] + 1,):
        raise ValueError(
            f"offsets must be (E + 1,) = ({w.shape[0] + 1},) int64, got {offsets.dtype} {tuple(offsets.shape)}"
        )
    if bias is not None:
        bias = check_tensor("bias", bias)
        if bias.shape != (w.shape[0], w.shape[2]) or bias.dtype != x.dtype:
            raise ValueError(
                f"bias must be (E, d_out) = {(w.shape[0], w.shape[2])} of x's dtype, got {tuple(bias.shape)}"
            )
    check_same_device(x=x, w=w, offsets=offsets)
    if _host_checks(offsets):
        steps = offsets.diff()
        if offsets[0] != 0 or offsets[-1] != x.shape[0] or (steps < 0).any():
            raise ValueError(
                f"offsets must start at 0, not decrease and end at the row count {x.shape[0]}, got {offsets.tolist()}"
            )
    chosen = resolve("moe_grouped_mm", x.device, backend)
    if chosen == "cpp":
        return torch.ops.dynkernels.moe_grouped_mm(x, w, offsets, bias)
    if chosen == "triton":
        return torch.ops.dynkernels.moe_grouped_mm_triton(x, w, offsets, bias)
    return ref.moe_grouped_mm(x, w, offsets, bias)


def moe_combine(y: torch.Tensor, plan, weights: torch.Tensor, *, backend=None) -> torch.Tensor:
    """See the module docstring: plan is a MoEPlan or its slot_row (T, k)."""
    y = check_tensor("y", y)
    slot_row = check_tensor("slot_row", plan.slot_row if isinstance(plan, MoEPlan) else plan)
    weights = check_tensor("weights", weights)
    if y.dim() != 2 or slot_row.dim() != 2 or slot_row.dtype != torch.int64:
        raise ValueError(
            f"y must be (R, d) and slot_row (T, k) int64, got {tuple(y.shape)} and {tuple(slot_row.shape)}"
        )
    if weights.shape != slot_row.shape or weights.dtype != y.dtype:
        raise ValueError(
            f"weights must be (T, k) = {tuple(slot_row.shape)} of y's dtype, got {weights.dtype} {tuple(weights.shape)}"
        )
    check_same_device(y=y, slot_row=slot_row, weights=weights)
    if _host_checks(slot_row) and slot_row.numel() and not (slot_row.min() >= -1 and slot_row.max() < y.shape[0]):
        raise IndexError(f"slot_row must lie in [-1, R = {y.shape[0]})")
    chosen = resolve("moe_combine", y.device, backend)
    if chosen == "cpp":
        return torch.ops.dynkernels.moe_combine(y, slot_row, weights)
    if chosen == "triton":
        return torch.ops.dynkernels.moe_combine_triton(y, slot_row, weights)
    return ref.moe_combine(y, slot_row, weights)


def load_balancing_loss(
    probs: torch.Tensor, experts: torch.Tensor, num_experts: int, *, first_choice_only: bool = False
) -> torch.Tensor:
    """See :func:`dynkernels.reference.token_routing_moe.load_balancing_loss`; probs (T, E)."""
    probs = check_tensor("probs", probs)
    num_experts = check_int("num_experts", num_experts, 1)
    if probs.dim() != 2 or probs.shape[1] != num_experts:
        raise ValueError(f"probs must be (T, E = {num_experts}), got {tuple(probs.shape)}")
    experts = _check_experts(experts, probs.shape[0], num_experts)
    return ref.load_balancing_loss(probs, experts, num_experts, first_choice_only=first_choice_only)


# ---- Triton twins (opaque custom ops, as the other families') ----------------


@torch.library.custom_op("dynkernels::moe_gather_triton", mutates_args=())
def _gather_triton(x: torch.Tensor, source: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
    return family_kernels(FAMILY).gather(x, source)


@torch.library.custom_op("dynkernels::moe_combine_triton", mutates_args=())
def _combine_triton(y: torch.Tensor, slot_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return family_kernels(FAMILY).combine(y, slot_row, weights)


@torch.library.custom_op("dynkernels::moe_combine_backward_triton", mutates_args=())
def _combine_backward_triton(
    grad: torch.Tensor, y: torch.Tensor, slot_row: torch.Tensor, weights: torch.Tensor, need_y: bool, need_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    gy, gw = family_kernels(FAMILY).combine_backward(grad, y, slot_row, weights, need_y, need_weights)
    return (y.new_empty(0) if gy is None else gy), (y.new_empty(0) if gw is None else gw)


@torch.library.custom_op("dynkernels::moe_grouped_mm_triton", mutates_args=())
def _grouped_mm_triton(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return family_kernels(FAMILY).grouped_mm(x, w, offsets, bias)


@torch.library.custom_op("dynkernels::moe_grouped_mm_backward_triton", mutates_args=())
def _grouped_mm_backward_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    need_x: bool,
    need_w: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernels = family_kernels(FAMILY)
    grad = grad.contiguous()
    gx = kernels.grouped_mm(grad, w.transpose(1, 2), offsets) if need_x else x.new_empty(0)
    gw = kernels.grouped_mm_wgrad(x, grad, offsets, w.shape[0]) if need_w else x.new_empty(0)
    gb = segment_reduce(grad, offsets, "sum", backend="triton") if need_bias else x.new_empty(0)
    return gx, gw, gb


# ---- fake kernels and gradients ----------------------------------------------


def _fake_gather(x, source, slot_row):
    return x.new_empty((source.shape[0], x.shape[1]))


def _fake_combine(y, slot_row, weights):
    return y.new_empty((slot_row.shape[0], y.shape[1]))


def _fake_combine_backward(grad, y, slot_row, weights, need_y, need_weights):
    return (dense_like(y) if need_y else y.new_empty(0)), (dense_like(weights) if need_weights else y.new_empty(0))


def _fake_grouped_mm(x, w, offsets, bias):
    return x.new_empty((x.shape[0], w.shape[2]))


def _fake_grouped_mm_backward(grad, x, w, offsets, need_x, need_w, need_bias):
    return (
        dense_like(x) if need_x else x.new_empty(0),
        dense_like(w) if need_w else x.new_empty(0),
        x.new_empty((w.shape[0], w.shape[2])) if need_bias else x.new_empty(0),
    )


def _fake_plan(experts, num_experts, capacity):
    tokens, k = experts.shape
    rows = tokens * k if capacity < 0 else num_experts * capacity
    new = experts.new_empty
    return new((rows,)), new((tokens, k)), new((num_experts + 1,)), new((num_experts,))


def _gather_setup(ctx, inputs, output):
    x, source, slot_row = inputs
    ctx.save_for_backward(slot_row)


def _gather_backward_with(combine_op):
    def backward(ctx, grad):
        (slot_row,) = ctx.saved_tensors
        ones = torch.ones(slot_row.shape, dtype=grad.dtype, device=grad.device)
        return combine_op(grad.contiguous(), slot_row, ones), None, None

    return backward


def _combine_setup(ctx, inputs, output):
    y, slot_row, weights = inputs
    ctx.save_for_backward(y, slot_row, weights)
    ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[2])


def _combine_backward(ctx, backward_op, grad):
    y, slot_row, weights = ctx.saved_tensors
    gy, gw = backward_op(grad.contiguous(), y, slot_row, weights, *ctx.need)
    return (gy if ctx.need[0] else None), None, (gw if ctx.need[1] else None)


def _grouped_setup(ctx, inputs, output):
    x, w, offsets, bias = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])


def _grouped_backward(ctx, backward_op, grad):
    x, w, offsets = ctx.saved_tensors
    gx, gw, gb = backward_op(grad.contiguous(), x, w, offsets, *ctx.need)
    return (gx if ctx.need[0] else None), (gw if ctx.need[1] else None), None, (gb if ctx.need[2] else None)


if has_extension():
    torch.library.register_fake("dynkernels::moe_plan")(_fake_plan)
    torch.library.register_fake("dynkernels::moe_gather")(_fake_gather)
    torch.library.register_autograd(
        "dynkernels::moe_gather",
        _gather_backward_with(torch.ops.dynkernels.moe_combine),
        setup_context=_gather_setup,
    )
torch.library.register_fake("dynkernels::moe_gather_triton")(_fake_gather)
torch.library.register_autograd(
    "dynkernels::moe_gather_triton",
    _gather_backward_with(torch.ops.dynkernels.moe_combine_triton),
    setup_context=_gather_setup,
)
_SUFFIXES = ([""] if has_extension() else []) + ["_triton"]
register_kernel_pairs(
    [(f"dynkernels::moe_combine{s}", f"dynkernels::moe_combine_backward{s}") for s in _SUFFIXES],
    fake=_fake_combine,
    fake_backward=_fake_combine_backward,
    setup_context=_combine_setup,
    backward=_combine_backward,
)
register_kernel_pairs(
    [(f"dynkernels::moe_grouped_mm{s}", f"dynkernels::moe_grouped_mm_backward{s}") for s in _SUFFIXES],
    fake=_fake_grouped_mm,
    fake_backward=_fake_grouped_mm_backward,
    setup_context=_grouped_setup,
    backward=_grouped_backward,
)
