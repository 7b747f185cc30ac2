"""Dynamic convolution modules over :func:`dynkernels.ops.dynamic_conv2d`
(issue 13): drop-ins for timm's ``CondConv2d`` and the official DY-CNN
``Dynamic_conv2d`` (kaijieshi7/Dynamic-convolution-Pytorch), with their
parameter layouts, so their state dicts load as they are."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._backends import check_module_backend
from ..ops._validation import check_int
from ..ops.dynamic_conv import _pair

__all__ = ["CondConv2d", "DynamicConv2d"]


class _ExpertConv(nn.Module):
    """K expert kernels (K, Cout, Cin/g, kh, kw) as one parameter, the conv
    geometry, and optional expert biases (K, Cout)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, experts, backend):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, 1)
        self.out_channels = check_int("out_channels", out_channels, 1)
        self.groups = check_int("groups", groups, 1)
        self.num_experts = check_int("num_experts", experts, 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride, self.dilation = _pair("stride", stride, 1), _pair("dilation", dilation, 1)
        if padding == "":  # timm's default: symmetric "same"-ish padding, ((s - 1) + d (k - 1)) // 2
            padding = tuple(
                ((s - 1) + d * (k - 1)) // 2
                for k, s, d in zip(self.kernel_size, self.stride, self.dilation, strict=True)
            )
        self.padding = _pair("padding", padding, 0)
        check_module_backend(backend, "dynamic_conv2d")
        self.backend = backend
        self.expert_shape = (out_channels, in_channels // groups, *self.kernel_size)

    def _conv(self, x, weight, routing, bias):
        return ops.dynamic_conv2d(
            x,
            weight.view(self.num_experts, *self.expert_shape),
            routing,
            bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            backend=self.backend,
        )

    def _init_experts(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Each expert as nn.Conv2d initialises its weight (and bias)."""
        fan_in = math.prod(self.expert_shape[1:])
        with torch.no_grad():
            for k in range(self.num_experts):
                nn.init.kaiming_uniform_(weight[k].view(self.expert_shape), a=math.sqrt(5))
                if bias is not None:
                    nn.init.uniform_(bias[k], -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, experts={self.num_experts}"
        )


class CondConv2d(_ExpertConv):
    """timm's ``CondConv2d``: ``forward(x, routing_weights)`` with the routing
    (B, K) supplied by the caller (timm's CondConv blocks compute
    ``sigmoid(Linear(GAP(x)))`` once per block). Parameters as timm's:
    ``weight`` (K, Cout * Cin/g * kh * kw), ``bias`` (K, Cout) or None, so a
    timm state dict loads as is. padding="" is timm's default (symmetric);
    timm's dynamic "same" padding is not offered."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding="",
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        num_experts: int = 4,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, num_experts, backend
        )
        self.weight = nn.Parameter(torch.empty(num_experts, math.prod(self.expert_shape)))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        self._init_experts(self.weight, self.bias)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight, routing_weights, self.bias)


class DynamicConv2d(_ExpertConv):
    """DY-CNN (Chen et al., CVPR 2020) as the official ``Dynamic_conv2d``: the
    routing is ``softmax(fc2(relu(fc1(GAP(x)))) / temperature)`` with
    ``fc1`` a bias-free 1x1 conv to ``int(in_channels * ratio) + 1`` channels
    (K when in_channels == 3) and ``fc2`` a 1x1 conv to K. Parameters as the
    official module's (``attention.fc1``, ``attention.fc2``, ``weight``
    (K, Cout, Cin/g, kh, kw), ``bias`` (K, Cout)), so its state dicts load.
    The temperature starts at 34 and :meth:`update_temperature` lowers it by 3
    down to 1 (the official ``updata_temperature``, called once per epoch for
    the paper's first 10 epochs); the official code asserts temperature % 3 == 1."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        ratio: float = 0.25,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 4,
        temperature: int = 34,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, num_experts, backend
        )
        temperature = check_int("temperature", temperature, 1)
        if temperature % 3 != 1:
            raise ValueError(
                f"temperature must be 1 more than a multiple of 3 (the official schedule), got {temperature}"
            )
        self.temperature = temperature
        hidden = int(in_channels * ratio) + 1 if in_channels != 3 else num_experts
        self.attention = nn.Module()
        self.attention.fc1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.attention.fc2 = nn.Conv2d(hidden, num_experts, 1, bias=True)
        for m in (self.attention.fc1, self.attention.fc2):  # the official init
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.attention.fc2.bias)
        self.weight = nn.Parameter(torch.empty(num_experts, *self.expert_shape))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_channels)) if bias else None
        self._init_experts(self.weight, None)

    def update_temperature(self) -> None:
        """The official schedule: minus 3, down to 1."""
        if self.temperature != 1:
            self.temperature -= 3

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1)
        logits = self.attention.fc2(F.relu(self.attention.fc1(pooled))).flatten(1)
        return torch.softmax(logits / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight, self.routing(x), self.bias)
