"""Evolving Attention (Wang et al., arXiv 2102.12895): the fused map step.

Each attention layer mixes its pre-softmax logits with the previous layer's
evolved logits, refines them with a KxK convolution that treats heads as
channels and the (query, key) plane as the image, and softmaxes the result.
See :mod:`dynkernels.reference.evolving_attention` for the formula and the official
code's quirks.
"""

from __future__ import annotations

import torch

from .. import reference
from .._backends import resolve
from .._extension import has_extension
from .._registry import register_op
from .._triton import family_kernels
from ..reference.evolving_attention import ACTIVATIONS, plain_attention_logits
from ._registration import dense_like, register_kernel_pairs
from ._validation import check_floating, check_real, check_tensor

__all__ = ["evolve_attention_logits", "evolving_attention"]

FAMILY = "evolving_attention"
_KERNELS = ("reference", "cpp", "cuda", "triton")
register_op(
    "evolve_attention_logits", FAMILY, _KERNELS, reference=reference.evolve_attention_logits, differentiable=_KERNELS
)
register_op("evolving_attention", FAMILY, _KERNELS, reference=reference.evolving_attention, differentiable=_KERNELS)

_ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def _check_mask(mask: torch.Tensor, logits: torch.Tensor) -> None:
    """A bool or floating mask that broadcasts to the logits' shape (checked without copying)."""
    check_tensor("mask", mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be bool or floating, got {mask.dtype}")
    try:
        if torch.broadcast_shapes(mask.shape, logits.shape) != logits.shape:
            raise RuntimeError
    except RuntimeError as exc:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the logits' {tuple(logits.shape)}"
        ) from exc


def _additive_mask(mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    """A bool mask (True masks out) or an additive float mask, broadcast to the
    logits' shape and dtype (a view: nothing is copied for broadcast dims)."""
    if mask is None:
        return None
    _check_mask(mask, logits)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=logits.dtype, device=logits.device).masked_fill(mask, float("-inf"))
    return mask.to(logits.dtype).expand(logits.shape)


def evolve_attention_logits(
    logits: torch.Tensor,
    prev_logits: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    w_prev: float,
    w_conv: float,
    activation: str = "relu",
    negative_slope: float = 0.01,
    mask: torch.Tensor | None = None,
    convolve_without_prev: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evolving Attention's map step, fused: mix, head-mixing convolution,
    activation, residual and masked softmax in one pass over the logits.

    Args:
        logits: ``(B, H, N, N)`` pre-softmax attention logits S_i (float32/float64 on CPU).
        prev_logits: the previous layer's evolved logits ``(B, H, N, N)``, or
            None for a layer without a previous map (the first layer, or after
            N changes). Then, as in the official code, there is no map step:
            ``evolved`` is ``logits`` (a view of it) and ``probs =
            softmax(logits + mask)`` (torch's softmax on every backend), and
            weight and bias get zero gradients.
        convolve_without_prev: with ``prev_logits=None``, run the map step on
            S alone (M = S: convolution, activation, residual) instead of plain
            attention. Not in the official code; kept for users who want the
            first layer to evolve too.
        weight: ``(H, H, K, K)``, K odd (3 in the paper); bias: ``(H,)`` or None.
        w_prev: weight of prev_logits in the mix (the official code's "beta").
        w_conv: weight of the convolution branch (the official code's "alpha").
        activation: "identity", "relu" or "leaky_relu" (negative_slope).
        mask: optional, broadcastable to ``(B, H, N, N)``: bool (True masks
            out) or additive float (0 or -inf). Added after the convolution,
            never convolved; no gradient flows to it. Keys masked by True or
            -inf pass no gradient back, so a fully masked row (NaN
            probabilities) contributes nothing to any gradient.
        backend: None (auto), "reference", "cpp" (CPU, float32/float64),
            "cuda" or "triton" (GPU: float16, bfloat16, float32, float64 with
            float32 or float64 arithmetic; Triton also runs CPU tensors under
            TRITON_INTERPRET=1). The CUDA kernel keeps a query row's band in
            shared memory and refuses sizes beyond the device's limit.

    Returns:
        ``(evolved, probs)``: the evolved logits A_i ``(B, H, N, N)``,
        unmasked (what the next layer receives), and ``softmax(A_i + mask)``.
        A fully masked row gives NaN, as torch.softmax does; NaN and Inf
        propagate as in the reference. Differentiable in logits, prev_logits,
        weight and bias; the parameter gradients are summed in a fixed order
        (deterministic).
    """
    for name, t in (("logits", logits), ("weight", weight)):
        check_tensor(name, t)
        check_floating(name, t)
    if logits.dim() != 4 or logits.shape[2] != logits.shape[3]:
        raise ValueError(f"logits must have shape (B, H, N, N), got {tuple(logits.shape)}")
    heads = logits.shape[1]
    if weight.dim() != 4 or weight.shape[:2] != (heads, heads) or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"weight must have shape (H, H, K, K) with H = {heads} (the logits' heads), got {tuple(weight.shape)}"
        )
    if weight.shape[-1] % 2 == 0:
        raise ValueError(f"the kernel size must be odd (same padding), got {weight.shape[-1]}")
    if prev_logits is not None:
        check_tensor("prev_logits", prev_logits)
        if prev_logits.shape != logits.shape:
            raise ValueError(
                f"prev_logits must match logits {tuple(logits.shape)}, got {tuple(prev_logits.shape)}; "
                "pass None where N changes (no mixing)"
            )
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (heads,):
            raise ValueError(f"bias must have shape (H,) = ({heads},), got {tuple(bias.shape)}")
    for name, t in (("prev_logits", prev_logits), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != logits.dtype or t.device != logits.device):
            raise TypeError(
                f"{name} must share the logits' dtype and device ({logits.dtype}, {logits.device}), got {t.dtype} on {t.device}"
            )
    if activation not in _ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    w_prev, w_conv = check_real("w_prev", w_prev), check_real("w_conv", w_conv)
    negative_slope = check_real("negative_slope", negative_slope)
    chosen = resolve("evolve_attention_logits", logits.device, backend)  # a bad backend raises on every path
    if prev_logits is None and not convolve_without_prev:
        if mask is not None:
            _check_mask(mask, logits)
        return plain_attention_logits(logits, weight, bias, mask)
    if chosen == "reference":
        return reference.evolve_attention_logits(
            logits,
            prev_logits,
            weight,
            bias,
            w_prev=w_prev,
            w_conv=w_conv,
            activation=activation,
            negative_slope=negative_slope,
            mask=mask,
            convolve_without_prev=True,
        )
    if chosen == "triton":
        op = torch.ops.dynkernels.evolve_attention_logits_triton
    else:
        if chosen == "cpp" and logits.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"evolve_attention_logits on CPU takes float32 or float64, got {logits.dtype}")
        op = torch.ops.dynkernels.evolve_attention_logits  # the C++ op; CPU and CUDA kernels by dispatch
    return op(
        logits,
        prev_logits,
        weight,
        bias,
        w_prev,
        w_conv,
        _ACTIVATION_CODES[activation],
        negative_slope,
        _additive_mask(mask, logits),
    )


def evolving_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prev_logits: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    w_prev: float,
    w_conv: float,
    activation: str = "relu",
    negative_slope: float = 0.01,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    convolve_without_prev: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Evolving Attention step: ``S = (q * scale) k^T``, the fused map
    step (:func:`evolve_attention_logits`), then ``out = dropout(P) v``.

    Args:
        q, k: ``(B, H, N, d)``; v: ``(B, H, N, d_v)``; all one dtype and device.
        prev_logits, weight, bias, w_prev, w_conv, activation, negative_slope,
            mask, convolve_without_prev, backend: as :func:`evolve_attention_logits`
            (without prev_logits this is plain attention, equal to
            ``F.scaled_dot_product_attention``, and the logits S are returned).
        scale: defaults to ``d ** -0.5``.
        dropout_p: dropout on P before ``P v`` (pass 0 in eval mode).

    Returns:
        ``(out (B, H, N, d_v), evolved logits A_i (B, H, N, N))``.

    The products run as batched matrix products (BLAS / cuBLAS) around the
    fused map step, so three N x N maps are stored (S, A, P) where the
    reference stores about nine. A single GPU kernel that also fuses Q K^T and
    P V (never storing S or P) is not part of this release.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        check_floating(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, d), got {tuple(t.shape)}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q and k must share (B, H, N, d) and v (B, H, N): got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(
                f"{name} must share q's dtype and device ({q.dtype}, {q.device}), got {t.dtype} on {t.device}"
            )
    if q.shape[-1] == 0:
        raise ValueError(f"q and k need a head dimension d >= 1, got q of shape {tuple(q.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else check_real("scale", scale)
    dropout_p = check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    logits = torch.matmul(q * scale, k.transpose(-2, -1))
    evolved, probs = evolve_attention_logits(
        logits,
        prev_logits,
        weight,
        bias,
        w_prev=w_prev,
        w_conv=w_conv,
        activation=activation,
        negative_slope=negative_slope,
        mask=mask,
        convolve_without_prev=convolve_without_prev,
        backend=backend,
    )
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return torch.matmul(probs, v), evolved


def _setup_context(ctx, inputs, output):
    logits, prev, weight, bias, w_prev, w_conv, activation, slope, mask = inputs
    # The mask goes to the backward too: keys it masks (-inf) pass no gradient.
    ctx.save_for_backward(logits, prev, weight, bias, output[1], output[0], mask)
    ctx.params = (w_prev, w_conv, activation, slope)
    ctx.has_prev, ctx.has_bias = prev is not None, bias is not None


def _backward(ctx, backward_op, grad_evolved, grad_probs):
    logits, prev, weight, bias, probs, evolved, mask = ctx.saved_tensors
    d_logits, d_prev, d_weight, d_bias = backward_op(
        grad_evolved,
        grad_probs,
        logits,
        prev if ctx.has_prev else None,
        weight,
        bias if ctx.has_bias else None,
        probs,
        evolved,
        *ctx.params,
        mask,
    )
    no_grad = (None,) * 5  # w_prev, w_conv, activation, slope, mask
    return (d_logits, d_prev if ctx.has_prev else None, d_weight, d_bias if ctx.has_bias else None, *no_grad)


def _fake_map(logits, prev, weight, bias, w_prev, w_conv, activation, slope, mask):
    return dense_like(logits), dense_like(logits)


def _fake_map_backward(
    grad_evolved, grad_probs, logits, prev, weight, bias, probs, evolved, w_prev, w_conv, activation, slope, mask
):
    empty = logits.new_empty((0,))
    return (
        dense_like(logits),
        dense_like(logits) if prev is not None else empty,
        dense_like(weight),
        dense_like(bias) if bias is not None else empty,
    )


# Opaque custom ops rather than torch.library.triton_op: see ops/pointops.py.
@torch.library.custom_op("dynkernels::evolve_attention_logits_triton", mutates_args=())
def _evolve_triton(
    logits: torch.Tensor,
    prev_logits: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_prev: float,
    w_conv: float,
    activation: int,
    negative_slope: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    contiguous = lambda t: None if t is None else t.contiguous()
    return family_kernels(FAMILY).evolve_logits_fwd(
        logits.contiguous(), contiguous(prev_logits), weight, bias, w_prev, w_conv, activation, negative_slope, mask
    )


@torch.library.custom_op("dynkernels::evolve_attention_logits_backward_triton", mutates_args=())
def _evolve_backward_triton(
    grad_evolved: torch.Tensor | None,
    grad_probs: torch.Tensor | None,
    logits: torch.Tensor,
    prev_logits: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    probs: torch.Tensor,
    evolved: torch.Tensor,  # unused: the Triton kernel recomputes Z
    w_prev: float,
    w_conv: float,
    activation: int,
    negative_slope: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    contiguous = lambda t: None if t is None else t.contiguous()
    return family_kernels(FAMILY).evolve_logits_bwd(
        contiguous(grad_evolved),
        contiguous(grad_probs),
        logits.contiguous(),
        contiguous(prev_logits),
        weight,
        bias,
        probs.contiguous(),
        w_prev,
        w_conv,
        activation,
        negative_slope,
        mask,
    )


register_kernel_pairs(
    (
        [("dynkernels::evolve_attention_logits", "dynkernels::evolve_attention_logits_backward")]
        if has_extension()
        else []
    )
    + [("dynkernels::evolve_attention_logits_triton", "dynkernels::evolve_attention_logits_backward_triton")],
    fake=_fake_map,
    fake_backward=_fake_map_backward,
    setup_context=_setup_context,
    backward=_backward,
)
