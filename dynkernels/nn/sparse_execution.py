"""Spatially sparse execution modules (issue 14): DynConv's mask unit and its
sparse MobileNetV2 inverted residual, over :mod:`dynkernels.ops.sparse_execution`.

Training runs the masked-dense formulation the official code trains with
(the whole block densely, ``x + mask * block(x)``); ``eval()`` runs the
sparse path (compaction, gathers, the 1x1s as GEMMs on the active rows, the
masked depthwise conv, BatchNorm folded, a scatter-add into the residual).
Both give the same output on every active pixel and ``x`` elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._backends import check_module_backend
from ..ops._validation import check_int

__all__ = ["GatedSkip", "MaskUnit", "SparseBasicBlock", "SparseBottleneck", "SparseInvertedResidual"]

_OPS = ("mask_to_index", "gather_pixels", "scatter_pixels", "masked_depthwise_conv2d", "masked_conv2d")


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """conv's weight and a bias with the BatchNorm's running statistics folded in."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def _gate(block, x, tau, noise):
    """The mask blocks' common start: x's shape checked, the mask unit run; info with the hard
    mask and the block's FLOPs per position."""
    if x.dim() != 4 or x.shape[1] != block.channels:
        raise ValueError(f"x must be (B, {block.channels}, H, W), got {tuple(x.shape)}")
    hard, _ = block.masker(x, tau, noise)
    return hard, dict(mask=hard, flops=block.flops_per_position())


def _input_rows(x, mask, halo, backend):
    """x's rows on the mask dilated by ``halo`` and their inverse map."""
    index, _, inverse = ops.mask_to_index(mask, halo=halo, inverse=True, backend=backend)
    return ops.gather_pixels(x, index, backend=backend), inverse


def _residual_relu(x, y, out_index, backend):
    """relu(x + y) at the output pixels (y their rows), relu(x) elsewhere: one
    scatter-add into a copy of x, then the ReLU in place on that copy."""
    return ops.scatter_pixels(y, out_index, x, mode="add", backend=backend).clamp_(min=0)


class _Squeeze(nn.Module):
    """DynConv's classification mask head: a 3x3 conv plus a per-sample FC of the pooled input."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.fc = nn.Linear(channels, 1, bias=True)
        self.conv = nn.Conv2d(channels, 1, stride=stride, kernel_size=3, padding=1, bias=True)

    def forward(self, x):
        pooled = self.fc(x.mean((2, 3))).view(x.shape[0], 1, 1, 1)
        if self.conv.stride != (1, 1) or x.dim() != 4:
            return self.conv(x) + pooled
        # the 3x3 conv to one channel as nine per-tap GEMVs over the channels and a shifted
        # sum of their planes (oneDNN's conv measured 2.2 ms at 8x64x56x56; the same sum)
        b, c, h, w = x.shape
        taps = self.conv.weight.view(c, 9)  # (C, taps (i, j))
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            planes = (x.permute(0, 2, 3, 1).reshape(b, h * w, c) @ taps).transpose(1, 2)
        else:
            planes = torch.bmm(taps.t().expand(b, 9, c), x.reshape(b, c, h * w))  # (see MaskUnit.forward)
        planes = F.pad(planes.reshape(b, 9, h, w), (1, 1, 1, 1))
        logits = sum(planes[:, 3 * i + j, i : i + h, j : j + w] for i in range(3) for j in range(3))
        return (logits + self.conv.bias).unsqueeze(1) + pooled


class MaskUnit(nn.Module):
    """DynConv's mask unit: mask logits from x, then the Gumbel gate.

    ``head="conv1x1"`` (the pose code's ``maskconv = Conv2d(C, 1, 1, stride)``)
    or ``"squeeze"`` (the classification code's Squeeze: a 3x3 conv plus an FC
    of the pooled input); parameter names follow the official module, so its
    state dict loads. ``forward(x, tau=1.0, noise=True) -> (hard, logits)``:
    hard (B, 1, H', W') float, from the straight-through Gumbel gate in
    training and ``logits >= 0`` in eval."""

    def __init__(self, channels: int, stride: int = 1, head: str = "conv1x1"):
        super().__init__()
        channels, stride = check_int("channels", channels, 1), check_int("stride", stride, 1)
        if head == "conv1x1":
            self.maskconv = nn.Conv2d(channels, 1, stride=stride, kernel_size=1, padding=0)
        elif head == "squeeze":
            self.maskconv = _Squeeze(channels, stride)
        else:
            raise ValueError(f"head must be 'conv1x1' or 'squeeze', got {head!r}")

    def forward(self, x: torch.Tensor, tau: float = 1.0, noise: bool = True):
        conv = self.maskconv
        if isinstance(conv, nn.Conv2d) and conv.stride == (1, 1) and x.dim() == 4:
            # the 1x1 conv to one channel as a GEMV over the channels (oneDNN's conv path
            # measured 0.66 ms at 8x24x56x56, this 0.1 ms); the same sum
            b, c, h, w = x.shape
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                flat = x.permute(0, 2, 3, 1).reshape(b, h * w, c) @ conv.weight.view(c, 1)
                logits = flat.view(b, h, w, 1).permute(0, 3, 1, 2)
            else:
                # bmm on the expanded weight: matmul's broadcast copies x when the weight requires grad
                logits = torch.bmm(conv.weight.view(1, 1, c).expand(b, 1, c), x.reshape(b, c, h * w)).view(b, 1, h, w)
            logits = logits + conv.bias.view(1, 1, 1, 1)
        else:
            logits = conv(x)
        return ops.gumbel_gate(logits, tau=tau, training=self.training, noise=noise), logits


class SparseInvertedResidual(nn.Module):
    """MobileNetV2's inverted residual with a DynConv spatial mask (the pose
    code's sparse block: stride 1, in == out channels, an expansion).

    Layers as the official ``InvertedResidual`` (``conv``: 1x1 expand, BN,
    ReLU6, depthwise 3x3, BN, ReLU6, 1x1 project, BN; ``masker``: the mask
    unit), so its state dict loads. ``forward(x, tau=1.0, noise=True) ->
    (out, info)``; info holds ``mask`` (the hard mask, differentiable through
    the gate in training), ``dilated`` (the mask dilated by the depthwise
    conv's 3x3 reach, bool) and ``flops`` (FLOPs per position on each, for
    :func:`dynkernels.ops.sparsity_loss`).

    Training: ``x + mask * conv(x)`` on the dense input (the official
    training path). Eval: the sparse path on the active pixels; BatchNorm
    folded into the convs' weights and biases from its running statistics.
    ``sparse=False`` in eval runs the dense masked formulation instead (for
    comparisons)."""

    def __init__(
        self,
        channels: int,
        expand_ratio: int = 6,
        *,
        head: str = "conv1x1",
        bn_momentum: float = 0.1,
        backend: str | None = None,
    ):
        super().__init__()
        channels = check_int("channels", channels, 1)
        expand_ratio = check_int("expand_ratio", expand_ratio, 2)
        check_module_backend(backend, *_OPS)
        hidden = round(channels * expand_ratio)
        self.channels, self.hidden, self.backend = channels, hidden, backend
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden, momentum=bn_momentum),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden, momentum=bn_momentum),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(channels, momentum=bn_momentum),
        )
        self.masker = MaskUnit(channels, 1, head)
        self.sparse = True

    def flops_per_position(self) -> tuple[float, float]:
        """(on the mask, on the dilated mask), as the official conv1x1 / conv3x3_dw count them."""
        return float(self.hidden * 9 + self.channels * self.hidden), float(self.hidden * self.channels)

    def forward(self, x: torch.Tensor, tau: float = 1.0, noise: bool = True):
        hard, info = _gate(self, x, tau, noise)
        if self.training or not self.sparse:
            info["dilated"] = F.max_pool2d(hard.detach(), 3, 1, 1) > 0.5
            return x + hard * self.conv(x), info
        out, inverse = self._sparse(x, hard > 0.5)
        info["dilated"] = (inverse >= 0).unsqueeze(1)  # the compaction's own dilated mask
        return out, info

    def _sparse(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        be = self.backend
        in_index, _, inverse = ops.mask_to_index(mask, halo=1, inverse=True, backend=be)
        out_index, _ = ops.mask_to_index(mask, backend=be)
        w1, b1 = _folded(self.conv[0], self.conv[1])
        w2, b2 = _folded(self.conv[3], self.conv[4])
        w3, b3 = _folded(self.conv[6], self.conv[7])
        rows = ops.gather_pixels(x, in_index, backend=be)
        hidden = torch.mm(rows, w1.flatten(1).t()).add_(b1).clamp_(0, 6)  # (addmm copies the bias in first)
        hidden = ops.masked_depthwise_conv2d(hidden, inverse, out_index, w2, b2, padding=1, backend=be).clamp_(0, 6)
        out = torch.addmm(b3, hidden, w3.flatten(1).t())
        return ops.scatter_pixels(out, out_index, x, mode="add", backend=be), inverse


class GatedSkip(nn.Module):
    """A residual block with a per-sample execution gate (SkipNet /
    ConvNet-AIG style): the gate is a Gumbel gate on a linear map of the
    pooled input, ``g = gumbel_gate(Linear(C, 1)(mean over H, W of x))``.

    ``forward(x, tau=1.0, noise=True) -> (out, gate)``, gate (B,) float.
    Training: the blend the official code trains with, ``g * block(x) + (1 -
    g) * x`` (every sample runs the block; the straight-through gate passes
    gradients to the gate's head). Eval: :func:`dynkernels.ops.run_on_subset`
    runs the block on the gated-on samples only, the others pass through
    (``capacity`` as there). ``block`` maps (n, C, H, W) to the same shape."""

    def __init__(self, block: nn.Module, channels: int, *, capacity: int | None = None):
        super().__init__()
        self.block = block
        self.gate = nn.Linear(check_int("channels", channels, 1), 1)
        self.capacity = capacity

    def forward(self, x: torch.Tensor, tau: float = 1.0, noise: bool = True):
        if x.dim() != 4 or x.shape[1] != self.gate.in_features:
            raise ValueError(f"x must be (B, {self.gate.in_features}, H, W), got {tuple(x.shape)}")
        logits = self.gate(x.mean((2, 3))).view(-1)
        gate = ops.gumbel_gate(logits, tau=tau, training=self.training, noise=noise)
        if self.training:
            g = gate.view(-1, 1, 1, 1)
            return g * self.block(x) + (1 - g) * x, gate
        return ops.run_on_subset(self.block, x, gate > 0.5, capacity=self.capacity), gate


class SparseBasicBlock(nn.Module):
    """ResNet's basic block with a DynConv spatial mask (the classification
    code's sparse BasicBlock at stride 1 without downsampling: two 3x3 conv +
    BN, the identity), on active pixels (``path="pixels"``, the default) or
    SBNet's tiles (``path="tiles"``) in eval.

    Layers and names as the official block (``conv1``, ``bn1``, ``conv2``,
    ``bn2``, ``masker.maskconv``; the official mask head is the Squeeze,
    ``head="squeeze"``). ``forward(x, tau=1.0, noise=True) -> (out, info)``.
    Training: ``relu(x + mask * bn2(conv2(relu(bn1(conv1(x))))))``, the
    official formulation. Eval, ``path="pixels"``: the input rows on the mask
    dilated by 2 are gathered, conv1 (BN folded) + ReLU runs at the mask
    dilated by 1 and conv2 (BN folded) at the mask, both as
    :func:`dynkernels.ops.masked_conv2d` (im2col on the active rows + GEMM;
    a tap outside the image reads zero, as the dense conv's padding), and
    ``relu(x + ...)`` is written at the mask into ``relu(x)``. Eval,
    ``path="tiles"``: the output pixels in ``tile`` x ``tile``
    tiles with an active pixel (:func:`dynkernels.ops.reduce_mask`); for each,
    the input block with the two convs' halo (tile + 4) is gathered, conv1
    (BN folded) and ReLU run VALID on it, the intermediate is zeroed outside
    the image (where the dense conv2 reads its zero padding), conv2 (BN
    folded) runs VALID, the mask selects the active pixels, and
    ``relu(x + ...)`` is scattered into ``relu(x)``. Equal to the dense
    masked block on every pixel."""

    def __init__(
        self, channels: int, *, path: str = "pixels", tile: int = 8, head: str = "squeeze", backend: str | None = None
    ):
        super().__init__()
        channels = check_int("channels", channels, 1)
        if path not in ("pixels", "tiles"):
            raise ValueError(f"path must be 'pixels' or 'tiles', got {path!r}")
        check_module_backend(backend, *_OPS)
        self.tile, self.path = check_int("tile", tile, 1), path
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.masker = MaskUnit(channels, 1, head)
        self.channels, self.backend, self.sparse = channels, backend, True

    def flops_per_position(self) -> tuple[float, float]:
        """(on the mask, on the dilated mask), as the official conv3x3 counts them."""
        per_conv = float(self.channels * self.channels * 9)
        return per_conv, per_conv

    def forward(self, x: torch.Tensor, tau: float = 1.0, noise: bool = True):
        hard, info = _gate(self, x, tau, noise)
        if self.training or not self.sparse or self.path == "tiles":
            info["dilated"] = F.max_pool2d(hard.detach(), 3, 1, 1) > 0.5
        if self.training or not self.sparse:
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(x + hard * y), info
        if self.path == "tiles":
            return self._tiles(x, hard), info
        mask, be = hard > 0.5, self.backend
        rows, inverse = _input_rows(x, mask, 2, be)
        mid_index, _, mid_inverse = ops.mask_to_index(mask, halo=1, inverse=True, backend=be)
        info["dilated"] = (mid_inverse >= 0).unsqueeze(1)  # the compaction's own dilated mask
        out_index, _ = ops.mask_to_index(mask, backend=be)
        w1, b1 = _folded(self.conv1, self.bn1)
        w2, b2 = _folded(self.conv2, self.bn2)
        hidden = ops.masked_conv2d(rows, inverse, mid_index, w1, b1, padding=1, backend=be).clamp_(min=0)
        y = ops.masked_conv2d(hidden, mid_inverse, out_index, w2, b2, padding=1, backend=be)
        return _residual_relu(x, y, out_index, be), info

    def _tiles(self, x: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        t, be = self.tile, self.backend
        tiles, _ = ops.reduce_mask(hard > 0.5, t, t, backend=be)
        w1, b1 = _folded(self.conv1, self.bn1)
        w2, b2 = _folded(self.conv2, self.bn2)
        inputs = ops.gather_tiles(x, tiles, t + 4, t, block_offset=-2, backend=be)
        hidden = torch.relu(F.conv2d(inputs, w1, b1))  # (M, C, t + 2, t + 2)
        ones = torch.ones_like(hard)
        hidden = hidden * ops.gather_tiles(ones, tiles, t + 2, t, block_offset=-1, backend=be)
        y = F.conv2d(hidden, w2, b2) * ops.gather_tiles(hard, tiles, t, t, backend=be)
        out = torch.relu(inputs[:, :, 2:-2, 2:-2] + y)
        return ops.scatter_tiles(out, tiles, torch.relu(x), t, backend=be)


class SparseBottleneck(nn.Module):
    """ResNet's bottleneck with a DynConv spatial mask (the classification
    code's sparse Bottleneck at stride 1 without downsampling: 1x1 reduce to
    ``planes``, 3x3, 1x1 expand to ``planes * 4 == inplanes``, each with BN).

    Layers and names as the official block (``conv1`` .. ``conv3``, ``bn1`` ..
    ``bn3``, ``masker.maskconv``; ``head="squeeze"`` is the official head).
    ``forward(x, tau=1.0, noise=True) -> (out, info)``. Training: ``relu(x +
    mask * bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))))``, the official
    formulation. Eval: conv1 as a GEMM on the rows of the mask dilated by 1,
    conv2 by :func:`dynkernels.ops.masked_conv2d` at the mask, conv3 a GEMM on
    its rows (BN folded throughout), ``relu(x + ...)`` written at the mask
    into ``relu(x)``. Equal to the dense masked block on every pixel."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, *, head: str = "squeeze", backend: str | None = None):
        super().__init__()
        inplanes, planes = check_int("inplanes", inplanes, 1), check_int("planes", planes, 1)
        if inplanes != planes * self.expansion:
            raise ValueError(
                f"inplanes must equal planes * 4 = {planes * self.expansion} (no downsampling), got {inplanes}"
            )
        check_module_backend(backend, *_OPS)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, inplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(inplanes)
        self.masker = MaskUnit(inplanes, 1, head)
        self.channels, self.planes, self.backend, self.sparse = inplanes, planes, backend, True

    def flops_per_position(self) -> tuple[float, float]:
        """(on the mask, on the dilated mask), as the official conv1x1 / conv3x3 count them."""
        return float(self.planes * self.planes * 9 + self.planes * self.channels), float(self.channels * self.planes)

    def forward(self, x: torch.Tensor, tau: float = 1.0, noise: bool = True):
        hard, info = _gate(self, x, tau, noise)
        if self.training or not self.sparse:
            info["dilated"] = F.max_pool2d(hard.detach(), 3, 1, 1) > 0.5
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(y)))))
            return torch.relu(x + hard * y), info
        mask, be = hard > 0.5, self.backend
        rows, inverse = _input_rows(x, mask, 1, be)
        info["dilated"] = (inverse >= 0).unsqueeze(1)  # the compaction's own dilated mask
        out_index, _ = ops.mask_to_index(mask, backend=be)
        w1, b1 = _folded(self.conv1, self.bn1)
        w2, b2 = _folded(self.conv2, self.bn2)
        w3, b3 = _folded(self.conv3, self.bn3)
        hidden = torch.mm(rows, w1.flatten(1).t()).add_(b1).clamp_(min=0)
        hidden = ops.masked_conv2d(hidden, inverse, out_index, w2, b2, padding=1, backend=be).clamp_(min=0)
        y = torch.mm(hidden, w3.flatten(1).t()).add_(b3)
        return _residual_relu(x, y, out_index, be), info
