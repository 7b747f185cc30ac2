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
differs from the previous one, does not mix (prev_logits None). The mask is
added after the convolution, never convolved: the official code applies no
mask, and convolving -inf would smear it into the neighbouring positions.
Note the names: the official code calls w_conv "alpha" and w_prev "beta"
(EA-AA-ResNet: alpha=1, beta=0.5); the paper swaps them, so they are
exposed under explicit names here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "leaky_relu")


def activate(x: torch.Tensor, activation: str, negative_slope: float = 0.01) -> torch.Tensor:
    if activation == "identity":
        return x
    if activation == "relu":
        return F.relu(x)
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The map step: logits (B, H, N, N), prev_logits (B, H, N, N) or None,
    weight (H, H, k, k) with k odd, bias (H,) or None, mask broadcastable to
    (B, H, N, N) (additive: 0 or -inf, or a bool tensor where True masks out).
    Returns (evolved logits A_i, unmasked; probabilities P_i)."""
    mixed = logits if prev_logits is None else (1.0 - w_prev) * logits + w_prev * prev_logits
    pad = weight.shape[-1] // 2
    conv = activate(F.conv2d(mixed, weight, bias, padding=pad), activation, negative_slope)
    evolved = w_conv * conv + (1.0 - w_conv) * mixed
    scores = evolved
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(mask, float("-inf"))
        else:
            scores = scores + mask
    return evolved, scores.softmax(dim=-1)


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
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole attention step: q, k, v (B, H, N, d) -> (out (B, H, N, d),
    evolved logits A_i (B, H, N, N)). scale defaults to d^-0.5."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    evolved, probs = evolve_attention_logits(
        logits, prev_logits, weight, bias, w_prev=w_prev, w_conv=w_conv, activation=activation, mask=mask
    )
    return torch.matmul(probs, v), evolved
