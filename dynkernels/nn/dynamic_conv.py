"""Dynamic convolution modules over :func:`dynkernels.ops.dynamic_conv2d`
(issue 13): drop-ins for timm's ``CondConv2d``, the official DY-CNN
``Dynamic_conv2d`` (kaijieshi7/Dynamic-convolution-Pytorch) and the official
``ODConv2d`` (OSVAI/ODConv), with their parameter layouts, so their state
dicts load as they are; ``CondConvBlock`` (CondConv with its own routing);
and :func:`convert_conv2d` / :func:`convert_model`, which turn plain
``nn.Conv2d`` layers into dynamic ones that compute the original conv at
initialisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._backends import check_module_backend
from ..ops._validation import check_int
from ..ops.dynamic_conv import _pair

__all__ = ["CondConv2d", "CondConvBlock", "DynamicConv2d", "ODConv2d", "convert_conv2d", "convert_model"]


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


class CondConvBlock(nn.Module):
    """CondConv with its own routing, as timm's CondConv blocks route:
    ``routing = sigmoid(routing_fn(GAP(x)))`` with ``routing_fn`` a
    ``nn.Linear(in_channels, num_experts)``, then ``conv(x, routing)``
    (a :class:`CondConv2d`). The sigmoid routing does not sum to one."""

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
        super().__init__()
        self.conv = CondConv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            num_experts,
            backend=backend,
        )
        self.routing_fn = nn.Linear(in_channels, num_experts)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.routing_fn(x.mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.routing(x))


class ODConvAttention(nn.Module):
    """ODConv's attention branch (the official ``Attention``): GAP, a
    bias-free 1x1 conv to ``max(int(in_planes * reduction), min_channel)``
    channels, BatchNorm, ReLU, then four heads divided by ``temperature``:
    ``channel_fc`` (sigmoid, (B, Cin)); ``filter_fc`` (sigmoid, (B, Cout)),
    absent for a depthwise conv; ``spatial_fc`` (sigmoid, (B, kh, kw)),
    absent for a 1x1 kernel; ``kernel_fc`` (softmax over K, (B, K)), absent
    when K = 1 (the routing is then all ones). Absent heads are None, as the
    official code's ``skip`` multiplies by 1."""

    def __init__(self, in_planes, out_planes, kernel_size, groups, reduction, kernel_num, min_channel):
        super().__init__()
        hidden = max(int(in_planes * reduction), min_channel)
        self.kernel_size, self.kernel_num, self.temperature = kernel_size, kernel_num, 1.0
        self.fc = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.channel_fc = nn.Conv2d(hidden, in_planes, 1)
        depthwise = in_planes == groups == out_planes
        self.filter_fc = None if depthwise else nn.Conv2d(hidden, out_planes, 1)
        self.spatial_fc = None if kernel_size == (1, 1) else nn.Conv2d(hidden, math.prod(kernel_size), 1)
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(hidden, kernel_num, 1)
        for m in self.modules():  # the official init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor):
        """(in_scale, out_scale, kernel_scale, routing) for ops.dynamic_conv2d."""
        h = F.relu(self.bn(self.fc(F.adaptive_avg_pool2d(x, 1))))
        batch, t = x.shape[0], self.temperature

        def head(fc):
            return None if fc is None else fc(h).flatten(1) / t

        channel, filt, spatial, kernel = (
            head(fc) for fc in (self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc)
        )
        routing = torch.softmax(kernel, 1) if kernel is not None else x.new_ones((batch, 1))
        return (
            torch.sigmoid(channel),
            None if filt is None else torch.sigmoid(filt),
            None if spatial is None else torch.sigmoid(spatial).view(batch, *self.kernel_size),
            routing,
        )


class ODConv2d(_ExpertConv):
    """ODConv (Li et al., ICLR 2022) as the official ``ODConv2d``: the
    kernel's four dimensions attended by :class:`ODConvAttention` (input
    channels, output filters, kernel taps, experts) and
    ``y = out_scale ⊙ conv(in_scale ⊙ x, kernel_scale ⊙ Σ_k pi_k W_k)``.
    Parameters as the official module's (``weight`` (K, Cout, Cin/g, kh, kw),
    ``attention.fc``, ``attention.bn``, ``attention.*_fc``), so its state
    dicts load. ``update_temperature(t)`` sets the attention temperature
    (1 by default, as the official code). ``bias`` (off, as the official
    module, which has none) adds a routed bias (K, Cout) after the filter
    scale; :func:`convert_conv2d` uses it for convs that have a bias. The
    attention's BatchNorm in training mode needs B > 1, as the official one."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        reduction: float = 0.0625,
        kernel_num: int = 4,
        *,
        bias: bool = False,
        min_channel: int = 16,
        backend: str | None = None,
    ) -> None:
        super().__init__(in_planes, out_planes, kernel_size, stride, padding, dilation, groups, kernel_num, backend)
        if not isinstance(reduction, (int, float)) or isinstance(reduction, bool) or not reduction > 0:
            raise ValueError(f"reduction must be a positive number, got {reduction!r}")
        self.kernel_num = self.num_experts
        self.attention = ODConvAttention(
            in_planes,
            out_planes,
            self.kernel_size,
            groups,
            reduction,
            self.num_experts,
            check_int("min_channel", min_channel, 1),
        )
        self.weight = nn.Parameter(torch.empty(self.num_experts, *self.expert_shape))
        for k in range(self.num_experts):  # the official init
            nn.init.kaiming_normal_(self.weight[k], mode="fan_out", nonlinearity="relu")
        self.bias = nn.Parameter(torch.zeros(self.num_experts, out_planes)) if bias else None

    def update_temperature(self, temperature: float) -> None:
        self.attention.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_scale, out_scale, kernel_scale, routing = self.attention(x)
        return ops.dynamic_conv2d(
            x,
            self.weight,
            routing,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            in_scale=in_scale,
            out_scale=out_scale,
            kernel_scale=kernel_scale,
            backend=self.backend,
        )


# ---- conversion of plain convolutions ---------------------------------------

_KINDS = ("condconv", "dycnn", "odconv")


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise ValueError(f"only zero-padded convolutions convert, got padding_mode={conv.padding_mode!r}")
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding='same' is asymmetric for kernel {conv.kernel_size}, dilation {conv.dilation}")
        return total[0] // 2, total[1] // 2
    return tuple(conv.padding)


def _zero_sum_noise(weight: torch.Tensor, scale: float, generator) -> torch.Tensor:
    """Noise (K, ...) that sums to zero over the experts, scale * std(weight)."""
    if scale == 0 or weight.shape[0] == 1:
        return torch.zeros_like(weight)
    noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype).to(weight.device)
    noise = noise - noise.mean(0, keepdim=True)
    return noise * (scale * weight.std())


def convert_conv2d(
    conv: nn.Conv2d,
    num_experts: int = 4,
    kind: str = "condconv",
    *,
    noise: float = 1e-2,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> nn.Module:
    """A dynamic conv that computes ``conv`` at initialisation (to rounding).

    kind: "condconv" (a :class:`CondConvBlock`), "dycnn" (a
    :class:`DynamicConv2d`) or "odconv" (an :class:`ODConv2d`). Each takes x
    alone, as the conv did, on the conv's device and dtype.

    * "dycnn" and "odconv" route by a softmax, which sums to one: every
      expert is a copy of the conv's weight (and bias), and the randomly
      initialised router breaks the symmetry between them. ODConv's sigmoid
      attentions start at exactly 1/2 (their heads' weights and biases
      zeroed), and the experts are scaled by 2 for each such head.
    * "condconv" routes by a sigmoid, which does not sum to one: the router
      starts at zero (every routing weight 1/2) and the experts at
      ``2 W / K + e_k``, with ``e_k`` noise (``noise`` times the weight's
      std) that sums to zero over the experts, so that the mixture is W and
      the identical-router symmetry is broken. noise=0 gives exact copies,
      which then receive identical gradients forever.
    """
    if type(conv) is not nn.Conv2d:
        raise TypeError(f"convert_conv2d takes an nn.Conv2d, got {type(conv).__name__}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    experts = check_int("num_experts", num_experts, 1)
    if not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    geometry = dict(
        stride=conv.stride, padding=_conv_padding(conv), dilation=conv.dilation, groups=conv.groups, backend=backend
    )
    w, b = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    shape = (conv.in_channels, conv.out_channels, conv.kernel_size)
    if kind == "condconv":
        module = CondConvBlock(*shape, bias=b is not None, num_experts=experts, **geometry)
        module.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module.routing_fn.weight.zero_()
            module.routing_fn.bias.zero_()
            copies = (2.0 / experts) * w.expand(experts, *w.shape)
            module.conv.weight.copy_((copies + _zero_sum_noise(copies, noise, generator)).reshape(experts, -1))
            if b is not None:
                module.conv.bias.copy_((2.0 / experts) * b.expand(experts, -1))
        return module
    if kind == "dycnn":
        module = DynamicConv2d(*shape, bias=b is not None, num_experts=experts, **geometry)
        gain = 1.0
    else:
        module = ODConv2d(*shape, kernel_num=experts, bias=b is not None, **geometry)
        att = module.attention
        heads = [fc for fc in (att.channel_fc, att.filter_fc, att.spatial_fc) if fc is not None]
        with torch.no_grad():
            for fc in heads:
                fc.weight.zero_()
                fc.bias.zero_()
        gain = 2.0 ** len(heads)
    module.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        module.weight.copy_(gain * w.expand(experts, *w.shape))
        if b is not None:
            module.bias.copy_(b.expand(experts, -1))
    return module


def convert_model(
    model: nn.Module,
    num_experts: int = 4,
    kind: str = "condconv",
    *,
    include=None,
    noise: float = 1e-2,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Replaces, in place, every ``nn.Conv2d`` of ``model`` (exactly that
    class; subclasses with their own forward are left) for which
    ``include(name, conv)`` is true (default: all) by
    ``convert_conv2d(conv, num_experts, kind, ...)``. Returns the model,
    which computes what it did at initialisation. A conv that cannot convert
    (a non-zero padding mode, asymmetric "same" padding) raises, naming it:
    exclude it with ``include``."""
    targets = [
        (name, m) for name, m in model.named_modules() if type(m) is nn.Conv2d and (include is None or include(name, m))
    ]
    for name, conv in targets:
        if not name:
            raise TypeError("convert_model takes a model that holds convolutions; convert one conv by convert_conv2d")
        try:
            new = convert_conv2d(conv, num_experts, kind, noise=noise, generator=generator, backend=backend)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot convert {name!r}: {err}") from err
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
