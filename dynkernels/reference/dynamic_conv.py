"""Reference dynamic convolution (CondConv, DY-CNN, ODConv; notes:
../shared/papers/dynamic_networks.md 1.1) in plain PyTorch, two ways:

* :func:`dynamic_conv2d`: the formula, one sample at a time, readable. The
  yardstick for the kernels (issue 13).
* :func:`dynamic_conv2d_official`: what the public code runs (timm's
  ``CondConv2d``, ODConv's ``_forward_impl_common``): the per-sample kernels
  stacked into one grouped convolution with ``groups = B * groups``, and, with
  ODConv's attentions, the ``(B, K, Cout, Cin/g, kh, kw)`` product summed over
  K. What the benchmarks compare against.

The math, for x (B, Cin, H, W), experts W (K, Cout, Cin/g, kh, kw), routing
pi (B, K), expert biases (K, Cout) or None, and ODConv's optional attentions
in_scale a_c (B, Cin), out_scale a_f (B, Cout), kernel_scale a_s (B, kh, kw):

    y_b = a_f,b ⊙ conv(a_c,b ⊙ x_b, a_s,b ⊙ Σ_k pi_bk W_k) + Σ_k pi_bk bias_k

with stride, padding, dilation and groups as ``F.conv2d``. The bias is added
after the output scale (ODConv has no bias; timm's CondConv has no scales).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dynamic_conv2d", "dynamic_conv2d_official"]


def _mixed(routing: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_k pi_bk W_k: (B, Cout, Cin/g, kh, kw)."""
    return torch.einsum("bk,k...->b...", routing, weight)


def dynamic_conv2d(x, weight, routing, bias=None, *, in_scale=None, out_scale=None, kernel_scale=None, **conv):
    """The formula above, one F.conv2d per sample. conv: stride, padding,
    dilation and groups, as F.conv2d takes them."""
    kernels = _mixed(routing, weight)
    if kernel_scale is not None:
        kernels = kernels * kernel_scale[:, None, None]  # a_s factors out of the sum over K
    biases = routing @ bias if bias is not None else None
    outputs = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1] if in_scale is None else x[b : b + 1] * in_scale[b, :, None, None]
        yb = F.conv2d(xb, kernels[b], None, **conv)
        if out_scale is not None:
            yb = yb * out_scale[b, :, None, None]
        if biases is not None:
            yb = yb + biases[b, :, None, None]
        outputs.append(yb)
    if not outputs:  # B = 0: the shape a conv of this geometry gives
        empty = F.conv2d(x.new_zeros((1, *x.shape[1:])), weight[0], None, **conv)
        return empty[:0]
    return torch.cat(outputs)


def dynamic_conv2d_official(
    x, weight, routing, bias=None, *, groups=1, in_scale=None, out_scale=None, kernel_scale=None, **conv
):
    """The public code's formulation (conv: stride, padding, dilation as
    F.conv2d takes them): one conv with groups = B * groups over
    x viewed as (1, B * Cin, H, W). With kernel_scale (ODConv), the per-sample
    kernels are ``(kernel_scale[:, None] * routing[..., None] * W[None]).sum(1)``,
    the (B, K, Cout, Cin/g, kh, kw) product ODConv builds; otherwise
    ``routing @ W.view(K, -1)`` as timm does."""
    batch, cin, h, w = x.shape
    k, cout = weight.shape[:2]
    if kernel_scale is not None:
        full = kernel_scale[:, None, None, None] * routing[:, :, None, None, None, None] * weight.unsqueeze(0)
        kernels = full.sum(1)
    else:
        kernels = (routing @ weight.reshape(k, -1)).view(batch, *weight.shape[1:])
    if in_scale is not None:
        x = x * in_scale[:, :, None, None]
    biases = (routing @ bias).reshape(-1) if bias is not None else None
    y = F.conv2d(
        x.reshape(1, batch * cin, h, w),
        kernels.reshape(batch * cout, *weight.shape[2:]),
        None if out_scale is not None else biases,
        groups=groups * batch,
        **conv,
    )
    y = y.view(batch, cout, y.shape[-2], y.shape[-1])
    if out_scale is not None:
        y = y * out_scale[:, :, None, None]
        if biases is not None:
            y = y + biases.view(batch, cout, 1, 1)
    return y
