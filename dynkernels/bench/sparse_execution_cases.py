"""Benchmark cases of spatially sparse execution (issue 14), part 1: the
compaction and the pixel gather / scatter at MobileNetV2 stage shapes,
against what the public code does (DynConv: nonzero of the flattened mask,
the dilated mask by a ones-kernel conv; index_select / index_add_ on the
(B*H*W, C) view). Floors: the bytes each op must move (mask in, indices out;
rows in and out) over the measured copy bandwidth."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..reference import sparse_execution as ref
from .base import Case as _case
from .base import Impl as _impl
from .base import have

FAMILY = "sparse_execution"


def _mask(batch: int, size: int, density: float, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * size + int(density * 100))
    return (torch.rand(batch, 1, size, size, generator=g) < density).to(device)


def _nonzero_dilated(mask: torch.Tensor, halo: int) -> torch.Tensor:
    """DynConv's path: a ones-kernel conv for the dilation, then nonzero (a host sync on GPUs)."""
    dilated = F.conv2d(mask.float(), torch.ones(1, 1, 2 * halo + 1, 2 * halo + 1, device=mask.device), padding=halo)
    return torch.nonzero((dilated > 0.5).reshape(-1)).reshape(-1)


def compaction_setup(batch, size, density, halo, device):
    mask = _mask(batch, size, density, device)
    index, count = ops.mask_to_index(mask, halo=halo)
    want = ref.mask_to_index(mask, halo=halo)[0]
    if not torch.equal(index[: int(count)], want):
        raise AssertionError("mask_to_index disagrees with the reference; refusing to time a wrong kernel")
    return [
        _impl("dynkernels", lambda: ops.mask_to_index(mask, halo=halo), "kernel"),
        _impl("conv2d dilation + nonzero (DynConv)", lambda: _nonzero_dilated(mask, halo), "anchor", True),
    ]


def gather_setup(batch, channels, size, density, channels_last, scatter, device):
    g = torch.Generator().manual_seed(channels + size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, size, size, generator=g).to(device, memory_format=fmt)
    index, _ = ops.mask_to_index(_mask(batch, size, density, device), halo=0)
    rows = torch.randn(index.numel(), channels, generator=g).to(device)
    if not scatter:
        ours = lambda: ops.gather_pixels(x, index)  # noqa: E731
        if channels_last:
            anchor = lambda: x.permute(0, 2, 3, 1).reshape(-1, channels).index_select(0, index)  # noqa: E731
        else:  # DynConv's gather reads NCHW: the per-channel planes at the pixels
            anchor = lambda: x.reshape(batch, channels, -1)[index // (size * size), :, index % (size * size)]  # noqa: E731
        name = "index_select"
    else:
        ours = lambda: ops.scatter_pixels(rows, index, x, mode="add")  # noqa: E731

        def anchor():
            out = x.clone(memory_format=fmt)
            if channels_last:  # (B*H*W, C) is a view of the channels-last copy
                out.permute(0, 2, 3, 1).view(-1, channels).index_add_(0, index, rows)
            else:
                plane = size * size
                where = (index[:, None] // plane, torch.arange(channels, device=x.device), index[:, None] % plane)
                out.view(batch, channels, -1).index_put_(where, rows, accumulate=True)
            return out

        name = "clone + index_add_"
    if not torch.equal(ours(), anchor()):
        raise AssertionError("dynkernels disagrees with the anchor; refusing to time a wrong kernel")
    return [_impl("dynkernels", ours, "kernel"), _impl(name, anchor, "anchor", True)]


def masked_depthwise_setup(batch, channels, size, density, device):
    """The depthwise 3x3 of a MobileNetV2 block on the mask: dynkernels on the
    gathered rows of the dilated mask, against the dense depthwise conv
    (oneDNN, NCHW and channels-last) that the masked-dense formulation runs
    before multiplying by the mask."""
    g = torch.Generator().manual_seed(channels + size)
    mask = _mask(batch, size, density, device)
    x = torch.randn(batch, channels, size, size, generator=g).to(device)
    weight = torch.randn(channels, 1, 3, 3, generator=g).to(device)
    in_index, _, inverse = ops.mask_to_index(mask, halo=1, inverse=True)
    out_index, _ = ops.mask_to_index(mask)
    rows = ops.gather_pixels(x, in_index)
    x_last = x.to(memory_format=torch.channels_last)
    ours = lambda: ops.masked_depthwise_conv2d(rows, inverse, out_index, weight, padding=1)  # noqa: E731
    dense = lambda: F.conv2d(x, weight, None, 1, 1, 1, channels) * mask  # noqa: E731
    dense_last = lambda: F.conv2d(x_last, weight, None, 1, 1, 1, channels) * mask  # noqa: E731
    if not torch.allclose(ours(), ops.gather_pixels(dense(), out_index), rtol=1e-4, atol=1e-4):
        raise AssertionError("masked_depthwise_conv2d disagrees with the dense conv; refusing to time it")
    return [
        _impl("dynkernels", ours, "kernel"),
        _impl("dense depthwise conv x mask (NCHW)", dense, "anchor"),
        _impl("dense depthwise conv x mask (channels-last)", dense_last, "anchor"),
    ]


def masked_conv_setup(batch, channels, size, density, device):
    """A ResNet 3x3 conv (channels -> channels) at the active pixels of a coherent mask, its input
    rows on the same pixels (a submanifold conv): dynkernels against the dense conv times the mask
    (oneDNN, both layouts) and, where it installs, spconv's SubMConv2d on the same active set."""
    g = torch.Generator().manual_seed(channels + size)
    coarse = torch.rand(batch, 1, max(1, size // 8), max(1, size // 8), generator=g) < density
    mask = F.interpolate(coarse.float(), size=(size, size)).to(device) > 0.5
    index, _, inverse = ops.mask_to_index(mask, inverse=True)
    x = (torch.randn(batch, channels, size, size, generator=g) * mask).to(device)
    weight = torch.randn(channels, channels, 3, 3, generator=g).to(device) / (3 * channels**0.5)
    rows = ops.gather_pixels(x, index)
    x_last = x.contiguous(memory_format=torch.channels_last)
    ours = lambda: ops.masked_conv2d(rows, inverse, index, weight, padding=1)  # noqa: E731
    dense = lambda: F.conv2d(x, weight, padding=1) * mask  # noqa: E731
    dense_last = lambda: F.conv2d(x_last, weight, padding=1) * mask  # noqa: E731
    if not torch.allclose(ours(), ops.gather_pixels(dense(), index), rtol=1e-4, atol=1e-4):
        raise AssertionError("masked_conv2d disagrees with the dense conv; refusing to time it")
    impls = [
        _impl("dynkernels", ours, "kernel"),
        _impl("dense conv x mask (NCHW)", dense, "anchor"),
        _impl("dense conv x mask (channels-last)", dense_last, "anchor"),
    ]
    if device == "cpu" and have("spconv"):
        import spconv.pytorch as spconv

        conv = spconv.SubMConv2d(channels, channels, 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(weight.permute(0, 2, 3, 1))  # spconv's (Cout, kh, kw, Cin)
        hw = size * size
        coords = torch.stack([index // hw, index // size % size, index % size], 1).int()

        def submanifold():  # the rule book built in every call, as our compaction is
            with torch.no_grad():
                return conv(spconv.SparseConvTensor(rows, coords, [size, size], batch)).features

        same = torch.allclose(submanifold(), ours(), rtol=1e-4, atol=1e-4)
        impls.append(_impl("spconv SubMConv2d", submanifold, "anchor", same, "same rows"))
    return impls


def _coherent(batch, channels, size, device, fmt):
    """Spatially coherent features (as a network's are), so that a mask drawn from them comes in
    blobs and its dilation (or tiling) adds a border, not a 9x area as for independent pixels."""
    coarse = torch.randn(batch, channels, max(1, size // 8), max(1, size // 8))
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.randn(x.shape)).to(device).contiguous(memory_format=fmt)  # (interpolate may give NHWC)


def _set_density(head, logits, density):
    with torch.no_grad():
        head.bias -= torch.quantile(logits, 1 - density) if density < 1 else logits.min() - 1  # all >= 1


def _eval_impls(block, x, dense):
    def sparse():
        with torch.no_grad():
            block.sparse = True
            return block(x)[0]

    def masked_dense():
        with torch.no_grad():
            block.sparse = False
            return block(x)[0]

    def plain():
        with torch.no_grad():
            return dense(x)

    if not torch.allclose(sparse(), masked_dense(), rtol=1e-4, atol=1e-4):
        raise AssertionError("the sparse block disagrees with the masked-dense block; refusing to time it")
    return [
        _impl("dynkernels", sparse, "kernel"),
        _impl("masked-dense block (DynConv training path)", masked_dense, "anchor", True),
        _impl("dense block (oneDNN)", plain, "anchor"),
    ]


def basic_setup(batch, channels, size, density, device, path="pixels", tile=8):
    """ResNet's basic block with a DynConv mask in eval, on the pixel or the tile path, against the
    dense block and the official masked-dense formulation; mask generation and compaction (or
    tiling) inside the timed region."""
    from ..nn.sparse_execution import SparseBasicBlock

    torch.manual_seed(channels * size + batch)
    block = SparseBasicBlock(channels, path=path, tile=tile).to(device).eval()
    x = _coherent(batch, channels, size, device, torch.contiguous_format)
    with torch.no_grad():
        _set_density(block.masker.maskconv.conv, block.masker.maskconv(x).flatten(), density)
    dense = lambda v: torch.relu(v + block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(v))))))  # noqa: E731
    return _eval_impls(block, x, dense)


def bottleneck_setup(batch, channels, size, density, device):
    """ResNet's bottleneck (channels -> channels / 4 -> 3x3 -> channels) with a DynConv mask in eval,
    against the dense block and the official masked-dense formulation."""
    from ..nn.sparse_execution import SparseBottleneck

    torch.manual_seed(channels * size + batch)
    block = SparseBottleneck(channels, channels // 4).to(device).eval()
    x = _coherent(batch, channels, size, device, torch.contiguous_format)
    with torch.no_grad():
        _set_density(block.masker.maskconv.conv, block.masker.maskconv(x).flatten(), density)

    def dense(v):
        y = torch.relu(block.bn1(block.conv1(v)))
        return torch.relu(v + block.bn3(block.conv3(torch.relu(block.bn2(block.conv2(y))))))

    return _eval_impls(block, x, dense)


def block_setup(batch, channels, size, density, device, channels_last=False):
    """MobileNetV2's inverted residual (expansion 6) with a DynConv mask, in
    eval: the sparse path against the dense block (oneDNN) and the official
    masked-dense formulation; mask generation and index construction inside
    the timed region. The mask unit's bias is set so that `density` of the
    pixels are active."""
    from ..nn.sparse_execution import SparseInvertedResidual

    torch.manual_seed(channels * size + batch)
    block = SparseInvertedResidual(channels, 6).to(device).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _coherent(batch, channels, size, device, fmt)
    with torch.no_grad():
        _set_density(block.masker.maskconv, block.masker.maskconv(x).flatten(), density)
    return _eval_impls(block, x, lambda v: v + block.conv(v))


def skip_setup(batch, channels, size, skip_rate, device):
    """Layer skipping in eval: a ResNet basic block (two 3x3 conv + BN, the
    residual) behind a per-sample gate, run by run_on_subset on the kept
    samples, against SkipNet's blend (every sample runs the block, then
    mask * block(x) + (1 - mask) * x)."""
    from torch import nn

    from ..nn.sparse_execution import GatedSkip

    class Basic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                nn.BatchNorm2d(channels),
            )

        def forward(self, x):
            return torch.relu(x + self.body(x))

    torch.manual_seed(batch + channels)
    skip = GatedSkip(Basic(), channels).to(device).eval()
    x = torch.randn(batch, channels, size, size).to(device)
    with torch.no_grad():
        logits = skip.gate(x.mean((2, 3))).view(-1)
        kept = round(batch * (1 - skip_rate))
        if kept == batch:
            skip.gate.bias -= logits.min() - 1  # every logit >= 1
        elif kept == 0:
            skip.gate.bias -= logits.max() + 1
        else:
            skip.gate.bias -= torch.sort(logits, descending=True).values[kept - 1 : kept + 1].mean()

    def ours():
        with torch.no_grad():
            return skip(x)[0]

    def blend():
        with torch.no_grad():
            gate = (skip.gate(x.mean((2, 3))).view(-1, 1, 1, 1) >= 0).to(x.dtype)
            return gate * skip.block(x) + (1 - gate) * x

    if not torch.allclose(ours(), blend(), rtol=1e-4, atol=1e-4):
        raise AssertionError("GatedSkip disagrees with the blend; refusing to time it")
    return [_impl("dynkernels", ours, "kernel"), _impl("SkipNet blend (every sample runs)", blend, "anchor", True)]


def cases(size: str, device: str) -> list:
    if size == "quick":
        masks = [(2, 14, 0.25, 1)]
        pixels = [(2, 16, 14, 0.25)]
    else:
        masks = [(8, 56, 0.25, 1), (8, 56, 0.5, 1), (1, 112, 0.25, 1)]
        pixels = [(8, 144, 56, 0.25), (8, 144, 56, 0.5)]
        if size == "full":
            masks += [(8, 56, 0.05, 1), (8, 56, 0.75, 1), (8, 28, 0.25, 2)]
            pixels += [(8, 144, 56, 0.05), (8, 32, 112, 0.25)]
    out = []
    depthwise = [(2, 16, 14, 0.25)] if size == "quick" else [(8, 144, 56, d) for d in (0.5, 0.25, 0.1)]
    for b, c, s, dens in depthwise:
        out.append(
            _case(
                FAMILY,
                "masked_depthwise_conv2d 3x3",
                f"B={b} C={c} {s}x{s} density={dens}",
                lambda a=(b, c, s, dens): masked_depthwise_setup(*a, device),
                dict(B=b, C=c, H=s, W=s, density=dens),
                (
                    "dynkernels",
                    "dense depthwise conv x mask (NCHW)",
                    "dense depthwise conv x mask (channels-last)",
                ),
                floor_bytes=4 * c * b * s * s * dens * 2,  # the active rows in and out (halo not counted)
            )
        )
    convs = [(2, 8, 16, 0.25)] if size == "quick" else [(8, 64, 56, d) for d in (0.5, 0.25, 0.1)]
    for b, c, s, dens in convs:
        out.append(
            _case(
                FAMILY,
                "masked_conv2d 3x3",
                f"B={b} C={c} {s}x{s} density={dens}",
                lambda a=(b, c, s, dens): masked_conv_setup(*a, device),
                dict(B=b, C=c, H=s, W=s, density=dens),
                ("dynkernels", "dense conv x mask (NCHW)", "dense conv x mask (channels-last)")
                + (("spconv SubMConv2d",) if device == "cpu" and have("spconv") else ()),
                floor_flops=2 * b * s * s * dens * c * c * 9,
            )
        )
    if size == "quick":
        blocks = [(2, 16, 14, 0.25, False)]
    else:
        densities = (1.0, 0.75, 0.5, 0.25, 0.1, 0.05) if size == "full" else (1.0, 0.75, 0.5, 0.25, 0.1)
        blocks = [(8, 24, 56, d, False) for d in densities] + [(8, 24, 56, 0.25, True), (1, 24, 112, 0.25, False)]
        # DynConv's pose hourglass (NUM_FEATURES 96: 96 channels, hidden 576) at its 64x64 and 32x32 levels
        blocks += [(8, 96, 64, d, False) for d in densities] + [(1, 96, 64, 0.25, False), (8, 96, 32, 0.25, False)]
        blocks += [(8, 96, 64, d, True) for d in (1.0, 0.25)]  # against the faster channels-last dense block
        if size == "full":
            blocks += [(8, 32, 28, d, False) for d in densities] + [(1, 64, 64, d, False) for d in (0.5, 0.25, 0.1)]
    skips = [(4, 16, 14, 0.5)] if size == "quick" else [(32, 64, 28, r) for r in (0.0, 0.25, 0.5, 0.75)]
    for b, c, s, rate in skips:
        out.append(
            _case(
                FAMILY,
                "GatedSkip eval (ResNet basic block)",
                f"B={b} C={c} {s}x{s} skip rate={rate}",
                lambda a=(b, c, s, rate, device): skip_setup(*a),
                dict(B=b, C=c, H=s, W=s, skip_rate=rate),
                ("dynkernels", "SkipNet blend (every sample runs)"),
                floor_flops=2 * 2 * round(b * (1 - rate)) * s * s * c * c * 9,
            )
        )
    if size == "quick":
        basics = [(2, 8, 16, 0.25, "pixels"), (2, 8, 16, 0.25, "tiles")]
        bottlenecks = [(2, 16, 14, 0.25)]
    else:
        dens_list = (1.0, 0.75, 0.5, 0.25, 0.1, 0.05) if size == "full" else (1.0, 0.75, 0.5, 0.25, 0.1)
        basics = [(8, 64, 56, d, "pixels") for d in dens_list] + [(1, 64, 56, 0.25, "pixels")]
        basics += [(8, 64, 56, d, "tiles") for d in ((1.0, 0.5, 0.25, 0.1) if size == "full" else (0.25,))]
        bottlenecks = [(8, 256, 56, d) for d in dens_list] + [(1, 256, 56, 0.25)]
    for b, c, s, dens, path in basics:
        out.append(
            _case(
                FAMILY,
                "SparseBasicBlock eval (pixels)" if path == "pixels" else "SparseBasicBlock eval (tiles 8x8)",
                f"B={b} C={c} {s}x{s} density={dens}",
                lambda a=(b, c, s, dens, device, path): basic_setup(*a),
                dict(B=b, C=c, H=s, W=s, density=dens, path=path),
                ("dynkernels", "masked-dense block (DynConv training path)", "dense block (oneDNN)"),
                floor_flops=2 * 2 * b * s * s * dens * c * c * 9,
            )
        )
    for b, c, s, dens in bottlenecks:
        w = c // 4
        out.append(
            _case(
                FAMILY,
                "SparseBottleneck eval",
                f"B={b} C={c} (width {w}) {s}x{s} density={dens}",
                lambda a=(b, c, s, dens, device): bottleneck_setup(*a),
                dict(B=b, C=c, H=s, W=s, density=dens),
                ("dynkernels", "masked-dense block (DynConv training path)", "dense block (oneDNN)"),
                floor_flops=2 * b * s * s * dens * (2 * c * w + 9 * w * w),
            )
        )
    for b, c, s, dens, last in blocks:
        out.append(
            _case(
                FAMILY,
                "SparseInvertedResidual eval",
                f"B={b} C={c} (hidden {6 * c}) {s}x{s} density={dens}" + (" channels-last" if last else ""),
                lambda a=(b, c, s, dens, device, last): block_setup(*a),
                dict(B=b, C=c, H=s, W=s, density=dens, layout="NHWC" if last else "NCHW"),
                ("dynkernels", "masked-dense block (DynConv training path)", "dense block (oneDNN)"),
                floor_flops=2 * b * s * s * dens * (2 * c * 6 * c + 9 * 6 * c),
            )
        )
    for b, s, dens, halo in masks:
        n = b * s * s
        out.append(
            _case(
                FAMILY,
                "mask_to_index",
                f"B={b} {s}x{s} density={dens} halo={halo}",
                lambda a=(b, s, dens, halo): compaction_setup(*a, device),
                dict(B=b, H=s, W=s, density=dens, halo=halo),
                ("dynkernels", "conv2d dilation + nonzero (DynConv)"),
                floor_bytes=n + 8 * n * min(1.0, dens * (2 * halo + 1) ** 2),  # the mask in, the indices out
            )
        )
    for b, c, s, dens in pixels:
        for channels_last in (False, True):
            for scatter in (False, True):
                layout = "channels-last" if channels_last else "NCHW"
                rows = int(b * s * s * dens)
                op = "scatter_pixels add" if scatter else "gather_pixels"
                moved = 4 * rows * c * 2 + 8 * rows  # rows read and written, indices
                if scatter:
                    moved += 4 * b * c * s * s * 2  # out copied into the result
                out.append(
                    _case(
                        FAMILY,
                        op,
                        f"B={b} C={c} {s}x{s} density={dens} {layout}",
                        lambda a=(b, c, s, dens, channels_last, scatter): gather_setup(*a, device),
                        dict(B=b, C=c, H=s, W=s, density=dens, layout=layout),
                        ("dynkernels", "clone + index_add_" if scatter else "index_select"),
                        floor_bytes=moved,
                    )
                )
    return out
