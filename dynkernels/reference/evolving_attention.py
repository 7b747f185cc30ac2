"""Reference Evolving Attention (Wang et al., arXiv 2102.12895) in plain
PyTorch, as the official code runs it: Conv2d, add, softmax, matmul, every
intermediate N x N map materialised.

One attention layer i, with logits S_i = (Q K^T) * scale of shape (B, H, N, N)
and the previous layer's evolved logits A_{i-1}:

    M_i = (1 - w_prev) * S_i + w_prev * A_{i-1}      (no mix: M_i = S_i)
    C_i = act(conv3x3_{H->H}(M_i) + bias)            zero padding, heads as channels
    A_i = w_conv * C_i + (1 - w_conv) * M_i
    P_i = softmax(A_i + mask);  out = P_i V

A_i, unmasked, goes to the next layer. The first layer, or a layer whose N
differs from the previous one (prev_logits None), has no map step at all, as
in both official code bases (EA-AA-ResNet skips it without a previous map of
the same size; EA-DC builds its layer-0 blocks with ``with_att_conv=False``):
A_i = S_i and P_i = softmax(S_i + mask), with no mix, convolution, activation
or residual; the convolution's parameters get zero gradients there.
``convolve_without_prev=True`` keeps the map step without a previous map
(M_i = S_i), a dynkernels extension. The mask is added after the
convolution, never convolved: the official code applies no mask, and
convolving -inf would smear it into the neighbouring positions. Keys whose
mask is -inf (or True) get probability 0 and pass no gradient to A_i, so a
fully masked row (NaN probabilities, as torch.softmax gives) contributes
nothing to any gradient.
Note the names: the official code calls w_conv "alpha" and w_prev "beta"
(EA-AA-ResNet: alpha=1, beta=0.5); the paper swaps them, so they are
exposed under explicit names here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["evolve_attention_logits", "evolving_attention"]

ACTIVATIONS = ("identity", "relu", "leaky_relu")


def activate(x: torch.Tensor, activation: str, negative_slope: float = 0.01) -> torch.Tensor:
    if activation == "identity":
        return x
    if activation == "relu":
        return F.relu(x)
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(scores + mask) over the last axis. mask: bool (True masks out)
    or additive float; keys masked by True or -inf get probability 0 and pass
    no gradient back (torch.where, so a NaN row's gradient stays out too)."""
    if mask is None:
        return scores.softmax(dim=-1)
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
    return torch.where(mask == float("-inf"), float("-inf"), scores + mask).softmax(dim=-1)


class _ZeroGradFor(torch.autograd.Function):
    """Returns x unchanged and gives each of ``params`` a zero gradient: a
    parameter that a path does not use still gets a gradient (DDP and
    optimisers see every parameter), one of zeros."""

    @staticmethod
    def forward(x, *params):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shapes = [(p.shape, p.dtype, p.device) for p in inputs[1:]]

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes))


def plain_attention_logits(
    logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer without a map step (the first layer, a stage change): A = S,
    P = softmax(S + mask); weight and bias get zero gradients."""
    params = [t for t in (weight, bias) if t is not None and t.requires_grad]
    evolved = _ZeroGradFor.apply(logits, *params) if params and torch.is_grad_enabled() else logits
    return evolved, masked_softmax(evolved, mask)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The map step: logits (B, H, N, N), prev_logits (B, H, N, N) or None,
    weight (H, H, k, k) with k odd, bias (H,) or None, mask broadcastable to
    (B, H, N, N) (additive: 0 or -inf, or a bool tensor where True masks out).
    Returns (evolved logits A_i, unmasked; probabilities P_i). Without
    prev_logits: plain attention (A_i = S_i), unless convolve_without_prev."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if prev_logits is None and not convolve_without_prev:
        return plain_attention_logits(logits, weight, bias, mask)
    mixed = logits if prev_logits is None else (1.0 - w_prev) * logits + w_prev * prev_logits
    pad = weight.shape[-1] // 2
    conv = activate(F.conv2d(mixed, weight, bias, padding=pad), activation, negative_slope)
    evolved = w_conv * conv + (1.0 - w_conv) * mixed
    return evolved, masked_softmax(evolved, mask)


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
    convolve_without_prev: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole attention step: q, k, v (B, H, N, d) -> (out (B, H, N, d),
    evolved logits A_i (B, H, N, N)). scale defaults to d^-0.5."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
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
    )
    return torch.matmul(probs, v), evolved
