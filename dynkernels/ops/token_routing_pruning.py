"""DynamicViT's ops (issue 15).

* ``batch_index_select(x (B, N, C) | (B, N), idx (B, N')) -> (B, N', C) | (B, N')``:
  per-sample selection (a ``torch.gather`` along the token axis, as
  DynamicViT's flat-index helper computes it); differentiable in x (repeated
  indices sum). A composition.
* ``softmax_with_policy(attn (B, H, N, N), policy (B, N, 1), *, eps=1e-6)``:
  DynamicViT's training-time masked softmax (see
  :mod:`dynkernels.reference.token_routing_pruning`) fused into one op with
  its backward: no (B, 1, N, N) mask, no float copy of the logits, no
  exp'd copy; the backward recomputes each row from the logits. Gradients to
  the logits and to the policy (the decisions are learned through it),
  including the row max's own gradient as torch routes it (to the first
  maximum). Computed in float32 for float32 / half inputs, float64 for
  float64 (DynamicViT computes float64 inputs in float32).

Backends of softmax_with_policy: "cpp" (auto on CPU), "triton" (auto on
CUDA), "reference"."""

from __future__ import annotations

import torch

from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ..reference import token_routing_pruning as ref
from ._registration import dense_like, register_kernel_pairs
from ._validation import check_real, check_same_device, check_tensor

__all__ = ["batch_index_select", "softmax_with_policy"]

FAMILY = "token_routing"
_KERNELS = ("reference", "cpp", "triton")
register_op(
    "softmax_with_policy",
    FAMILY,
    _KERNELS,
    reference=ref.softmax_with_policy,
    differentiable=_KERNELS,
    auto={"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")},
)


def batch_index_select(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """See the module docstring."""
    x, idx = check_tensor("x", x), check_tensor("idx", idx)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (B, N, C) or (B, N), got {tuple(x.shape)}")
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx must be (B = {x.shape[0]}, N') int64, got {idx.dtype} {tuple(idx.shape)}")
    check_same_device(x=x, idx=idx)
    if idx.device.type == "cpu" and not torch.compiler.is_compiling() and idx.numel():
        if not (idx.min() >= 0 and idx.max() < x.shape[1]):
            raise IndexError(f"idx must lie in [0, N = {x.shape[1]})")
    if x.dim() == 2:
        return torch.gather(x, 1, idx)
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[2]))


def softmax_with_policy(attn: torch.Tensor, policy: torch.Tensor, *, eps: float = 1e-6, backend=None):
    """See the module docstring."""
    attn, policy = check_tensor("attn", attn), check_tensor("policy", policy)
    if attn.dim() != 4 or attn.shape[2] != attn.shape[3] or not attn.is_floating_point():
        raise ValueError(f"attn must be floating (B, H, N, N), got {attn.dtype} {tuple(attn.shape)}")
    b, _, n, _ = attn.shape
    if policy.shape != (b, n, 1) or not policy.is_floating_point():
        raise ValueError(f"policy must be floating (B, N, 1) = {(b, n, 1)}, got {policy.dtype} {tuple(policy.shape)}")
    check_same_device(attn=attn, policy=policy)
    eps = check_real("eps", eps)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    chosen = resolve("softmax_with_policy", attn.device, backend)
    if chosen == "cpp":
        return torch.ops.dynkernels.softmax_with_policy(attn, policy, eps)
    if chosen == "triton":
        return torch.ops.dynkernels.softmax_with_policy_triton(attn, policy, eps)
    return ref.softmax_with_policy(attn, policy, eps)


@torch.library.custom_op("dynkernels::softmax_with_policy_triton", mutates_args=())
def _policy_triton(attn: torch.Tensor, policy: torch.Tensor, eps: float) -> torch.Tensor:
    return family_kernels(FAMILY).softmax_with_policy(attn, policy, eps)


@torch.library.custom_op("dynkernels::softmax_with_policy_backward_triton", mutates_args=())
def _policy_backward_triton(
    grad: torch.Tensor, attn: torch.Tensor, policy: torch.Tensor, eps: float, need_attn: bool, need_policy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    ga, gp = family_kernels(FAMILY).softmax_with_policy_backward(grad, attn, policy, eps, need_attn, need_policy)
    return (attn.new_empty(0) if ga is None else ga), (policy.new_empty(0) if gp is None else gp)


def _fake_policy(attn, policy, eps):
    return dense_like(attn)


def _fake_policy_backward(grad, attn, policy, eps, need_attn, need_policy):
    return (dense_like(attn) if need_attn else attn.new_empty(0)), (
        dense_like(policy) if need_policy else policy.new_empty(0)
    )


def _policy_setup(ctx, inputs, output):
    attn, policy, eps = inputs
    ctx.save_for_backward(attn, policy)
    ctx.eps = eps
    ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])


def _policy_backward(ctx, backward_op, grad):
    attn, policy = ctx.saved_tensors
    ga, gp = backward_op(grad.contiguous(), attn, policy, ctx.eps, *ctx.need)
    return (ga if ctx.need[0] else None), (gp if ctx.need[1] else None), None


register_kernel_pairs(
    ([("dynkernels::softmax_with_policy", "dynkernels::softmax_with_policy_backward")] if has_extension() else [])
    + [("dynkernels::softmax_with_policy_triton", "dynkernels::softmax_with_policy_backward_triton")],
    fake=_fake_policy,
    fake_backward=_fake_policy_backward,
    setup_context=_policy_setup,
    backward=_policy_backward,
)
