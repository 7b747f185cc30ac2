"""Spatially sparse execution (issue 14): the references.

The readable formulations the kernels are held to, after DynConv
(thomasverelst/dynconv: ``maskunit.py``, ``loss.py``, ``cuda.py``):

* ``mask_to_index``: the active pixels of a (B, 1, H, W) mask -- with a halo,
  of the mask dilated by a (2 halo + 1)^2 square, as DynConv's ExpandMask
  does with a ones kernel -- as flat indices b*H*W + y*W + x in increasing
  order (``nonzero`` of the flattened mask), and the inverse map
  (B, H, W) -> row or -1.
* ``gather_pixels`` / ``scatter_pixels``: rows (P, C) of a (B, C, H, W)
  tensor at flat pixel indices, and back (set or add); index -1 is padding
  (a zero row; nothing written).
* ``masked_depthwise_conv2d``: a depthwise conv evaluated at the active
  output pixels only, reading the input rows through the inverse map (zero
  outside the dilated mask or the image): DynConv's ``masked_conv_dw``.
* ``gumbel_gate``: DynConv's Gumbel unit -- in training
  sigmoid((logits + g1 - g2) / tau) with g = -log(-log(U + eps) + eps), made
  hard by a straight-through step at 1/2; at inference logits >= 0.
* ``sparsity_loss``: DynConv's SparsityCriterion (network MSE to the budget
  plus the annealed per-block bounds).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "gather_pixels",
    "gather_tiles",
    "gumbel_gate",
    "mask_to_index",
    "masked_depthwise_conv2d",
    "reduce_mask",
    "scatter_pixels",
    "scatter_tiles",
    "sparsity_loss",
]


def dilate_mask(mask: torch.Tensor, halo: int) -> torch.Tensor:
    """mask (B, 1, H, W) bool dilated by a (2 halo + 1)^2 square (zero outside the image)."""
    if halo == 0:
        return mask
    ones = torch.ones(1, 1, 2 * halo + 1, 2 * halo + 1, dtype=torch.float64, device=mask.device)
    return F.conv2d(mask.to(torch.float64), ones, padding=halo) > 0.5


def mask_to_index(mask: torch.Tensor, *, halo: int = 0, inverse: bool = False):
    """(index (count,) int64, count () int64[, inverse (B, H, W) int64])."""
    active = dilate_mask(mask, halo).reshape(-1)
    index = torch.nonzero(active).reshape(-1)
    count = torch.tensor(index.numel(), dtype=torch.int64, device=mask.device)
    if not inverse:
        return index, count
    b, _, h, w = mask.shape
    table = torch.full((b * h * w,), -1, dtype=torch.int64, device=mask.device)
    table[index] = torch.arange(index.numel(), device=mask.device)
    return index, count, table.view(b, h, w)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """(B*H*W, C): pixel p's channels in row p."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def gather_pixels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W), index (P,) in [-1, B*H*W) -> rows (P, C); a zero row for -1."""
    rows = _pixels(x)
    valid = index >= 0
    picked = rows[index.clamp(min=0)]
    return picked * valid[:, None].to(picked.dtype)


def scatter_pixels(rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor, *, mode: str = "set") -> torch.Tensor:
    """out (B, C, H, W) with rows (P, C) written at the pixels of index (set, or
    add); rows whose index is -1 are dropped. Out of place."""
    b, c, h, w = out.shape
    keep = index >= 0
    flat = _pixels(out).clone()
    if mode == "set":
        flat = flat.index_put((index[keep],), rows[keep])
    else:
        flat = flat.index_add(0, index[keep], rows[keep])
    return flat.view(b, h, w, c).permute(0, 3, 1, 2)


def gumbel_gate(
    logits: torch.Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    training: bool = True,
    noise: bool = True,
    generator: torch.Generator | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """DynConv's Gumbel unit: see the module docstring. ``hard=False`` returns the soft sigmoid."""
    if not training:
        return (logits >= 0).to(logits.dtype)
    x = logits
    if noise:
        u1 = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
        u2 = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
        g1 = -torch.log(-torch.log(u1 + eps) + eps)
        g2 = -torch.log(-torch.log(u2 + eps) + eps)
        x = x + g1 - g2
    soft = torch.sigmoid(x / tau)
    if not hard:
        return soft
    return ((soft >= 0.5).to(soft.dtype) - soft).detach() + soft


def sparsity_loss(
    masks: list[torch.Tensor],
    dilated: list[torch.Tensor | None],
    flops: list[tuple[float, float]],
    *,
    target: float,
    epoch: float,
    num_epochs: int,
) -> torch.Tensor:
    """DynConv's SparsityCriterion. Per block i: its mask (hard, differentiable
    through the straight-through step), its dilated mask (or None), and the
    FLOPs per position of the work done on each (flops_std, flops_dilate).
    cost_i = active(dilated) flops_dilate + active(mask) flops_std over the
    same with every position active; the network term is
    (sum cost / sum total - target)^2, the block term the mean of the squared
    excesses over the annealed bounds [p target, 1 - p (1 - target)],
    p = cos(min(max(epoch / (0.33 num_epochs), 0), 1) pi / 2)^2."""
    p = epoch / (0.33 * num_epochs)
    progress = math.cos(min(max(p, 0.0), 1.0) * (math.pi / 2)) ** 2
    upper = 1 - progress * (1 - target)
    lower = progress * target
    cost = total = block = 0.0
    for m, d, (f_std, f_dil) in zip(masks, dilated, flops, strict=True):
        c = m.sum() * f_std
        t = m.numel() * f_std
        if d is not None:
            c = c + d.sum() * f_dil
            t = t + d.numel() * f_dil
        share = c / t
        block = block + torch.clamp(share - upper, min=0) ** 2 + torch.clamp(lower - share, min=0) ** 2
        cost, total = cost + c, total + t
    return (cost / total - target) ** 2 + block / len(masks)


def masked_depthwise_conv2d(
    rows: torch.Tensor,
    inverse_map: torch.Tensor,
    out_index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
) -> torch.Tensor:
    """The dense equivalent: rows (P_in, C) placed in a zero image through the
    inverse map (B, H, W), a depthwise F.conv2d, its output rows at out_index
    (P_out,) (zero rows for -1)."""
    image = _rows_to_image(rows, inverse_map)
    return gather_pixels(F.conv2d(image, weight, bias, stride, padding, dilation, rows.shape[1]), out_index)


def masked_conv2d(
    rows: torch.Tensor,
    inverse_map: torch.Tensor,
    out_index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
) -> torch.Tensor:
    """As masked_depthwise_conv2d, for a dense F.conv2d (groups 1)."""
    image = _rows_to_image(rows, inverse_map)
    return gather_pixels(F.conv2d(image, weight, bias, stride, padding, dilation), out_index)


def _rows_to_image(rows, inverse_map):
    """rows (P, C) placed in a zero (B, C, H, W) image through the inverse map."""
    b, h, w = inverse_map.shape
    c = rows.shape[1]
    table = inverse_map.reshape(-1)
    active = table >= 0
    dense = torch.zeros(b * h * w, c, dtype=rows.dtype, device=rows.device)
    dense = dense.index_put((torch.nonzero(active).reshape(-1),), rows[table[active]])
    return dense.view(b, h, w, c).permute(0, 3, 1, 2)


def reduce_mask(
    mask: torch.Tensor,
    block_size,
    block_stride,
    block_offset=(0, 0),
    block_count=None,
    *,
    threshold: float = 0.0,
    mode: str = "max",
    empty_block: bool = False,
):
    """SBNet's reduce_mask (sbnet_ops/reduce_mask.cc, its CPU loops in your
    words): block (by, bx) of sample n covers rows [oy + by*sy, +bh) and
    columns [ox + bx*sx, +bw) clipped to the image; "max": active if a value
    there exceeds the threshold; "avg": if their sum over the block's full
    area bh*bw does. -> (indices (M, 3) int64 (n, by, bx) in that order,
    count () int64). ``empty_block=True`` keeps SBNet's quirk: with no active
    block it returns the one block (0, 0, 0) and a count of 1."""
    (bh, bw), (sy, sx), (oy, ox) = block_size, block_stride, block_offset
    b, _, h, w = mask.shape
    ch, cw = block_count if block_count is not None else default_block_count((h, w), block_stride, block_offset)
    values = mask.to(torch.float64)
    found = []
    for n in range(b):
        for by in range(ch):
            for bx in range(cw):
                y0, x0 = oy + by * sy, ox + bx * sx
                window = values[n, 0, max(0, y0) : max(0, y0 + bh), max(0, x0) : max(0, x0 + bw)]
                if mode == "avg":
                    active = float(window.sum()) / (bh * bw) > threshold
                else:
                    active = bool((window > threshold).any())
                if active:
                    found.append((n, by, bx))
    if not found and empty_block:
        found = [(0, 0, 0)]
    indices = torch.tensor(found, dtype=torch.int64).reshape(-1, 3).to(mask.device)
    return indices, torch.tensor(len(found), dtype=torch.int64, device=mask.device)


def default_block_count(size, block_stride, block_offset):
    """Blocks whose first row / column lies in the image: ceil((H - oy) / sy), ceil((W - ox) / sx)."""
    return tuple(-(-(n - o) // s) for n, s, o in zip(size, block_stride, block_offset, strict=True))


def gather_tiles(x: torch.Tensor, tiles: torch.Tensor, block_size, block_stride, block_offset=(0, 0)) -> torch.Tensor:
    """SBNet's sparse_gather: for each tile (n, by, bx) of tiles (M, 3), the
    block of x (B, C, H, W) at rows oy + by*sy + [0, bh) and columns
    ox + bx*sx + [0, bw), zero outside the image -> (M, C, bh, bw); a row of
    -1s gives a zero block."""
    (bh, bw), (sy, sx), (oy, ox) = block_size, block_stride, block_offset
    b, c, h, w = x.shape
    out = torch.zeros(tiles.shape[0], c, bh, bw, dtype=x.dtype, device=x.device)
    for m, (n, by, bx) in enumerate(tiles.tolist()):
        if n < 0:
            continue
        y0, x0 = oy + by * sy, ox + bx * sx
        ys, xs = max(0, y0), max(0, x0)
        ye, xe = min(h, y0 + bh), min(w, x0 + bw)
        if ys < ye and xs < xe:
            out[m, :, ys - y0 : ye - y0, xs - x0 : xe - x0] = x[n, :, ys:ye, xs:xe]
    return out


def scatter_tiles(
    blocks: torch.Tensor, tiles: torch.Tensor, out: torch.Tensor, block_stride, block_offset=(0, 0), *, mode="set"
) -> torch.Tensor:
    """SBNet's sparse_scatter: a copy of out with each block (C, th, tw) of
    blocks (M, C, th, tw) written (set) or added (add) at rows oy + by*sy +
    [0, th) and columns ox + bx*sx + [0, tw), clipped to the image; tiles of
    -1 are dropped."""
    (sy, sx), (oy, ox) = block_stride, block_offset
    th, tw = blocks.shape[2:]
    h, w = out.shape[2:]
    result = out.clone()
    for m, (n, by, bx) in enumerate(tiles.tolist()):
        if n < 0:
            continue
        y0, x0 = oy + by * sy, ox + bx * sx
        ys, xs = max(0, y0), max(0, x0)
        ye, xe = min(h, y0 + th), min(w, x0 + tw)
        if ys >= ye or xs >= xe:
            continue
        piece = blocks[m, :, ys - y0 : ye - y0, xs - x0 : xe - x0]
        if mode == "set":
            result[n, :, ys:ye, xs:xe] = piece
        else:
            result[n, :, ys:ye, xs:xe] = result[n, :, ys:ye, xs:xe] + piece
    return result
