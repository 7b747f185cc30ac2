"""Pointformer (Pan et al., "3D Object Detection with Pointformer", CVPR 2021,
arXiv 2012.11409): Local, Global and Local-Global Transformers, coordinate
refinement, and the VoteNet backbone with the official ScanNet and SUN RGB-D
configurations.

Every module takes ``backend``: None runs the dynkernels kernels (FPS, ball
query, fused local attention, three-NN interpolation); "reference" runs the
official formulation (pure-PyTorch sampling and grouping, sequence-first
nn.MultiheadAttention); a kernel backend name ("cpp", "cuda", "triton") is
passed to the ops that have it. Both paths share parameters and give the
same outputs within the tolerance of their summation orders.

Layouts follow mmdet3d: xyz ``(B, N, 3)``, features ``(B, C, N)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from .. import ops, reference
from .._backends import op_backend
from ..ops._validation import check_tensor
from .pointformer_layers import PointformerDecoderLayer, PointformerEncoderLayer, PositionEncoding

__all__ = [
    "CONFIGS",
    "CoordinateRefinement",
    "GlobalTransformer",
    "LocalGlobalTransformer",
    "LocalTransformer",
    "PointFPModule",
    "PointformerBackbone",
    "PointformerBlock",
]

# The official configs (Pointformer@0116deb, votenet_ptr_*.py); dim_feedforward = 2 * d_model.
CONFIGS = {
    "scannet": dict(
        cloud_points=40000,
        npoint=(2048, 1024, 512, 256),
        radius=(0.2, 0.4, 0.8, 1.2),
        nsample=(64, 32, 16, 16),
        d_model=(64, 128, 256, 512),
        out_channels=(128, 256, 512, 512),
        nhead=8,
        prenorm=True,
        global_drop=0.2,
        local_drop=0.0,
        fp_channels=((256, 256), (256, 256)),
        in_channels=1,
    ),
}
# SUN RGB-D differs in input size, nsample, heads, the layer type and dropout.
CONFIGS["sunrgbd"] = dict(
    CONFIGS["scannet"], cloud_points=20000, nsample=(16, 16, 16, 16), nhead=4, prenorm=False, global_drop=0.1
)


_PER_BLOCK = ("npoint", "radius", "nsample", "d_model", "out_channels")
_KEYS = (*_PER_BLOCK, "nhead", "prenorm", "global_drop", "local_drop", "fp_channels", "in_channels")


def _check_config(config) -> dict:
    """A config name or dict, checked at construction: every key, one entry
    per block in each per-block tuple, at most blocks - 1 FP stages."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"config must be one of {sorted(CONFIGS)} or a dict, got {config!r}")
        return dict(CONFIGS[config])
    if not isinstance(config, dict):
        raise TypeError(f"config must be a name or a dict, got {type(config).__name__}")
    cfg = dict(config)
    missing = [k for k in _KEYS if k not in cfg]
    if missing:
        raise ValueError(f"config lacks {missing}")
    lengths = {k: len(cfg[k]) for k in _PER_BLOCK}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"config's per-block entries must have one length (one entry per block), got {lengths}")
    if len(cfg["fp_channels"]) > lengths["npoint"] - 1:
        raise ValueError(f"config's fp_channels has {len(cfg['fp_channels'])} stages, more than blocks - 1")
    return cfg


def _check_points_and_features(owner: str, xyz, features, d_model: int) -> None:
    """xyz (B, M, 3) and features (B, d_model, M) of one set of points."""
    check_tensor("xyz", xyz)
    check_tensor("features", features)
    if xyz.dim() != 3 or xyz.shape[2] != 3:
        raise ValueError(f"{owner}: xyz must be (B, M, 3), got {tuple(xyz.shape)}")
    if (
        features.dim() != 3
        or features.shape[1] != d_model
        or features.shape[0] != xyz.shape[0]
        or features.shape[2] != xyz.shape[1]
    ):
        raise ValueError(
            f"{owner}: features must be (B, d_model, M) = ({xyz.shape[0]}, {d_model}, {xyz.shape[1]}), "
            f"got {tuple(features.shape)}"
        )


def _path(backend: str | None) -> str:
    return "reference" if backend == "reference" else "kernel"


def check_lengths(lengths: torch.Tensor | None, batch: int, n: int, minimum: int) -> list[int] | None:
    """Per-cloud point counts as Python ints, validated: (B,) ints in [minimum, N]."""
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must be a (B,) = ({batch},) tensor, got {lengths!r}")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    counts = [int(v) for v in lengths.tolist()]
    if any(c < minimum or c > n for c in counts):
        raise ValueError(f"lengths must lie in [{minimum}, N={n}] (at least npoint points per cloud), got {counts}")
    return counts


@dataclass
class Grouped:
    """What sampling and grouping produced for one block."""

    centers: torch.Tensor  # (B, M, 3)
    fps_idx: torch.Tensor  # (B, M) int64
    ball_idx: torch.Tensor  # (B, M, ns) int64
    offsets: torch.Tensor  # (B, M, ns, 3): x_j - x_i (or x_j with relative_xyz=False)


def sample_and_group(xyz, npoint, radius, nsample, lengths, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """D-FPS then ball query, per cloud when lengths are given (padding is never
    sampled nor grouped). Returns (fps_idx (B, M), ball_idx (B, M, ns))."""
    fps_backend, ball_backend = op_backend(backend, "furthest_point_sample"), op_backend(backend, "ball_query")
    if lengths is None:
        fps_idx = ops.furthest_point_sample(xyz, npoint, backend=fps_backend)
        centers = xyz.gather(1, fps_idx.unsqueeze(-1).expand(-1, -1, 3))
        return fps_idx, ops.ball_query(xyz, centers, radius, nsample, backend=ball_backend)
    fps_parts, ball_parts = [], []
    for b, count in enumerate(lengths):
        cloud = xyz[b : b + 1, :count]
        idx = ops.furthest_point_sample(cloud, npoint, backend=fps_backend)
        centers = cloud.gather(1, idx.unsqueeze(-1).expand(-1, -1, 3))
        fps_parts.append(idx)
        ball_parts.append(ops.ball_query(cloud, centers, radius, nsample, backend=ball_backend))
    return torch.cat(fps_parts), torch.cat(ball_parts)


def _encoder_stack(d_model, nhead, num_layers, dim_feedforward, dropout, prenorm) -> nn.ModuleList:
    """num_layers Pointformer encoder layers (FFN 2 * d_model unless given), as nn.TransformerEncoder holds them."""
    ff = dim_feedforward or 2 * d_model
    return nn.ModuleList([PointformerEncoderLayer(d_model, nhead, ff, dropout, prenorm) for _ in range(num_layers)])


class CoordinateRefinement(nn.Module):
    """Pointformer's coordinate refinement (paper Eq. 5-6; absent from the
    official code): each centroid moves to the attention-weighted mean of its
    group, the weights being the last Local Transformer layer's attention
    averaged over heads, read at the centroid's row.

    Args:
        row: "centroid", "first" or "mean"; see :func:`dynkernels.ops.coordinate_refinement`.
        detach: stop gradients through the refined coordinates (the authors'
            choice is unknown; default False lets them train the attention).
    """

    def __init__(self, row: str = "centroid", *, detach: bool = False, backend: str | None = None) -> None:
        super().__init__()
        if row not in ops.pointformer.ROW_MODES:
            raise ValueError(f"row must be one of {ops.pointformer.ROW_MODES}, got {row!r}")
        self.row, self.detach, self.backend = row, detach, backend

    def row_index(self, grouped_xyz: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """(B, M) query row per group for grouped_xyz (B, 3, M, S)."""
        return ops.pointformer._row_index(self.row, grouped_xyz.shape[-1], grouped_xyz, centers)

    def forward(self, attn: torch.Tensor, grouped_xyz: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
        """attn (B, M, H, R, S), grouped_xyz (B, 3, M, S) absolute -> refined centers (B, M, 3)."""
        backend = op_backend(self.backend, "coordinate_refinement")
        refined = ops.coordinate_refinement(attn, grouped_xyz, row=row_index, backend=backend)
        return refined.detach() if self.detach else refined

    def extra_repr(self) -> str:
        return f"row={self.row!r}, detach={self.detach}"


class LocalTransformer(nn.Module):
    """Pointformer's Local Transformer: D-FPS to npoint centers, ball query of
    nsample neighbours, features + PE(x_j - x_i), a 2-layer Transformer inside
    every group (no padding mask: ball-query duplicates are tokens, as in the
    official code), max-pool over the group, then a 1x1 conv.

    ``forward(xyz (B, N, 3), features (B, C, N), lengths=None)`` returns
    ``(centers (B, M, 3), features (B, C, M), fps_idx (B, M))``; with
    ``refine`` set, centers are the refined coordinates.

    Args:
        relative_xyz: encode ``x_j - x_i`` (the official code under mmdet3d <=
            0.15). False encodes absolute ``x_j``, as newer mmdet3d silently
            does (Pointformer issue #6).
        refine: a :class:`CoordinateRefinement`, or None.
    """

    def __init__(
        self,
        npoint: int,
        radius: float,
        nsample: int,
        d_model: int,
        nhead: int,
        *,
        num_layers: int = 2,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        prenorm: bool = True,
        relative_xyz: bool = True,
        refine: CoordinateRefinement | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.npoint, self.radius, self.nsample, self.d_model = npoint, radius, nsample, d_model
        self.relative_xyz, self.backend = relative_xyz, backend
        self.pe = PositionEncoding(d_model)
        self.layers = _encoder_stack(d_model, nhead, num_layers, dim_feedforward, dropout, prenorm)
        self.fc = nn.Conv1d(d_model, d_model, 1)
        self.refine = refine

    def forward(self, xyz, features, lengths: list[int] | None = None):
        if features.shape[1] != self.d_model:
            raise ValueError(f"features must have d_model={self.d_model} channels, got {tuple(features.shape)}")
        batch = xyz.shape[0]
        with record_function("pointformer.sampling"):
            fps_idx, ball_idx = sample_and_group(xyz, self.npoint, self.radius, self.nsample, lengths, self.backend)
        path = _path(self.backend)
        with record_function("pointformer.grouping"):
            centers = xyz.gather(1, fps_idx.unsqueeze(-1).expand(-1, -1, 3))
            if path == "reference":
                x, grouped_abs = self._group_reference(xyz, features, centers, ball_idx)
            else:
                x, grouped_abs = self._group_kernel(xyz, features, centers, ball_idx)
            row_index = None
            if self.refine is not None:
                row_index = self.refine.row_index(grouped_abs, centers)  # (B, M)
        g, s = x.shape[:2]
        attn = None
        with record_function("pointformer.local_attention"):
            for i, layer in enumerate(self.layers):
                last = i == len(self.layers) - 1
                rows = row_index.reshape(g) if (last and row_index is not None) else None
                x, attn_i = layer(x, path=path, local=True, row_index=rows, backend=self.backend)
                if last:
                    attn = attn_i
            pooled = x.amax(dim=1).view(batch, self.npoint, self.d_model).transpose(1, 2)  # (B, C, M)
            out = self.fc(pooled)
        if self.refine is not None:
            with record_function("pointformer.refinement"):
                if path == "reference":  # the head-averaged maps (G, S, S): pick the row in the refinement
                    attn5 = attn.view(batch, self.npoint, 1, s, s)
                    centers = self.refine(attn5, grouped_abs, row_index)
                else:  # the fused attention already gave the picked rows (G, S)
                    attn5 = attn.view(batch, self.npoint, 1, 1, s)
                    centers = self.refine(attn5, grouped_abs, torch.zeros_like(row_index))
        return centers, out, fps_idx

    def _offsets(self, grouped_xyz, centers, valid):
        rel = grouped_xyz - centers.unsqueeze(2) if self.relative_xyz else grouped_xyz
        return torch.where(valid, rel, torch.zeros_like(rel))

    def _group_reference(self, xyz, features, centers, ball_idx):
        """Official layout: channel-first grouping, Conv2d PE, (B*M, ns, C) tokens."""
        grouped_feat = reference.grouping_operation(features, ball_idx)  # (B, C, M, ns)
        grouped_abs = reference.grouping_operation(xyz.transpose(1, 2).contiguous(), ball_idx)  # (B, 3, M, ns)
        valid = (ball_idx >= 0).unsqueeze(1)
        rel = grouped_abs - centers.transpose(1, 2).unsqueeze(-1) if self.relative_xyz else grouped_abs
        rel = torch.where(valid, rel, torch.zeros_like(rel))
        x = grouped_feat + self.pe.reference(rel)  # (B, C, M, ns)
        batch, c, m, ns = x.shape
        return x.permute(0, 2, 3, 1).reshape(batch * m, ns, c), grouped_abs

    def _group_kernel(self, xyz, features, centers, ball_idx):
        """Channel-last: rows of C features gathered once, PE as linear layers."""
        batch, c, n = features.shape
        m, ns = ball_idx.shape[1:]
        rows = features.transpose(1, 2).reshape(batch * n, c)
        rows = torch.cat([rows, rows.new_zeros((1, c))])  # index batch*n reads the zero row (-1 slots)
        base = (torch.arange(batch, device=xyz.device) * n).view(batch, 1, 1)
        flat = torch.where(ball_idx >= 0, ball_idx + base, batch * n).reshape(-1)
        grouped_feat = rows.index_select(0, flat).view(batch * m, ns, c)
        grouped_xyz = xyz.reshape(batch * n, 3)
        grouped_xyz = torch.cat([grouped_xyz, grouped_xyz.new_zeros((1, 3))]).index_select(0, flat)
        grouped_xyz = grouped_xyz.view(batch, m, ns, 3)
        offsets = self._offsets(grouped_xyz, centers, (ball_idx >= 0).unsqueeze(-1))
        x = grouped_feat + self.pe(offsets.view(batch * m, ns, 3))
        return x, grouped_xyz.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"npoint={self.npoint}, radius={self.radius}, nsample={self.nsample}, d_model={self.d_model}, "
            f"relative_xyz={self.relative_xyz}, backend={self.backend}"
        )


class GlobalTransformer(nn.Module):
    """Pointformer's Global Transformer: features + PE(absolute xyz), a 2-layer
    Transformer over all M points of each cloud, then a 1x1 conv to
    out_channels. ``forward(xyz (B, M, 3), features (B, C, M)) -> (B, C_out, M)``."""

    def __init__(
        self,
        d_model: int,
        out_channels: int,
        nhead: int,
        *,
        num_layers: int = 2,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        prenorm: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.pe = PositionEncoding(d_model)
        self.layers = _encoder_stack(d_model, nhead, num_layers, dim_feedforward, dropout, prenorm)
        self.fc = nn.Conv1d(d_model, out_channels, 1)

    @record_function("pointformer.global_attention")
    def forward(self, xyz: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        _check_points_and_features("GlobalTransformer", xyz, features, self.fc.in_channels)
        path = _path(self.backend)
        if path == "reference":
            x = (features + self.pe.reference(xyz.transpose(1, 2))).transpose(1, 2)
        else:
            x = features.transpose(1, 2) + self.pe(xyz)
        for layer in self.layers:
            x, _ = layer(x, path=path, local=False, backend=self.backend)
        return self.fc(x.transpose(1, 2))


class LocalGlobalTransformer(nn.Module):
    """Pointformer's Local-Global Transformer (switched off in the official
    configs): the M sampled points (LT features + PE) attend to all N input
    points (block input features + PE, absolute coordinates, one shared PE).
    ``forward(centers (B, M, 3), local (B, C, M), xyz (B, N, 3), features
    (B, C, N), lengths=None) -> (B, C, M)``, added by the caller to ``local``.
    With lengths, padded input points are masked out of the keys and out of
    the PE's batch statistics."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        *,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        prenorm: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.backend, self.d_model = backend, d_model
        self.pe = PositionEncoding(d_model)
        self.layer = PointformerDecoderLayer(d_model, nhead, dim_feedforward or 2 * d_model, dropout, prenorm)

    @record_function("pointformer.local_global_attention")
    def forward(self, centers, local, xyz, features, lengths: list[int] | None = None):
        _check_points_and_features("LocalGlobalTransformer (centers, local)", centers, local, self.d_model)
        _check_points_and_features("LocalGlobalTransformer (xyz, features)", xyz, features, self.d_model)
        path = _path(self.backend)
        pad = None
        if lengths is not None:
            counts = torch.tensor(lengths, device=xyz.device)
            pad = torch.arange(xyz.shape[1], device=xyz.device)[None, :] >= counts[:, None]  # (B, N) True = padding
        if path == "reference":
            tgt = (local + self.pe.reference(centers.transpose(1, 2))).transpose(1, 2)
            if pad is None:
                mem_pe = self.pe.reference(xyz.transpose(1, 2))
            else:  # BN statistics over the real points only
                packed = self.pe.reference(xyz[~pad].t().unsqueeze(0)).squeeze(0).t()
                mem_pe = features.new_zeros((xyz.shape[0], xyz.shape[1], packed.shape[1]))
                mem_pe[~pad] = packed
                mem_pe = mem_pe.transpose(1, 2)
            memory = (features + mem_pe).transpose(1, 2)
        else:
            tgt = local.transpose(1, 2) + self.pe(centers)
            memory = features.transpose(1, 2) + self.pe(xyz, None if pad is None else ~pad)
        out = self.layer(tgt, memory, path=path, memory_padding_mask=pad, backend=self.backend)
        return out.transpose(1, 2)


class PointformerBlock(nn.Module):
    """One down-sampling block: LT, then (optionally) LGT added to it, then GT."""

    def __init__(
        self,
        npoint,
        radius,
        nsample,
        d_model,
        out_channels,
        nhead,
        *,
        prenorm,
        local_drop,
        global_drop,
        use_decoder=False,
        relative_xyz=True,
        refine=None,
        backend=None,
    ) -> None:
        super().__init__()
        self.local = LocalTransformer(
            npoint,
            radius,
            nsample,
            d_model,
            nhead,
            dropout=local_drop,
            prenorm=prenorm,
            relative_xyz=relative_xyz,
            refine=refine,
            backend=backend,
        )
        self.local_global = (
            LocalGlobalTransformer(d_model, nhead, dropout=global_drop, prenorm=prenorm, backend=backend)
            if use_decoder
            else None
        )
        self.glob = GlobalTransformer(
            d_model, out_channels, nhead, dropout=global_drop, prenorm=prenorm, backend=backend
        )

    def forward(self, xyz, features, lengths=None):
        centers, local, fps_idx = self.local(xyz, features, lengths)
        if self.local_global is not None:
            local = local + self.local_global(centers, local, xyz, features, lengths)
        return centers, self.glob(centers, local), fps_idx


class PointFPModule(nn.Module):
    """PointNet++ feature propagation (mmdet3d ``PointFPModule``): inverse
    distance weights ``1/(d+1e-8)`` over the three nearest source points
    (three_nn distances carry no gradient, as in mmcv), interpolation,
    concatenation with the skip features, then 1x1 Conv-BN-ReLU layers."""

    def __init__(self, mlp_channels: tuple[int, ...], backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend
        layers = []
        for c_in, c_out in zip(mlp_channels[:-1], mlp_channels[1:], strict=True):
            layers += [nn.Conv1d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True)]
        self.mlps = nn.Sequential(*layers)

    @record_function("pointformer.feature_propagation")
    def forward(self, target, source, target_feats, source_feats):
        backend = op_backend(self.backend, "three_nn")  # three_interpolate has the same backends
        dist, idx = ops.three_nn(target, source, backend=backend)
        recip = 1.0 / (dist + 1e-8)
        weight = (recip / recip.sum(dim=2, keepdim=True)).to(source_feats.dtype)
        interpolated = ops.three_interpolate(source_feats, idx, weight, backend=backend)
        x = torch.cat([interpolated, target_feats], dim=1) if target_feats is not None else interpolated
        return self.mlps(x)


class PointformerBackbone(nn.Module):
    """The Pointformer VoteNet backbone: a 1x1 conv on the per-point features,
    4 :class:`PointformerBlock` s, 2 :class:`PointFPModule` s up to
    npoint[1] seeds (1024 x 256 channels with the official configs).

    Args:
        config: "scannet" or "sunrgbd" (see :data:`CONFIGS`), or a dict with
            the same keys.
        use_decoder: per block, whether to run the Local-Global Transformer
            (the official configs switch it off: ``(False,) * 4``).
        refine: None, or a row mode ("centroid", "first", "mean") to refine
            every block's centroids; refined coordinates feed the Global
            Transformer, the next block, feature propagation and the seeds.
        refine_detach: stop gradients through refined coordinates.
        relative_xyz: the LT position encoding on ``x_j - x_i`` (official); False for absolute.
        backend: None (kernels) or "reference" (the official formulation), or a kernel backend.

    ``forward(points (B, N, 3 + in_channels), lengths=None)`` returns mmdet3d's
    dict: ``fp_xyz``, ``fp_features``, ``fp_indices`` (lists, last = seeds)
    and ``sa_xyz``, ``sa_features``, ``sa_indices``. ``lengths`` (B,) gives
    per-cloud point counts of a padded batch: padding is never sampled,
    grouped or attended to, so each cloud's outputs equal those of the cloud
    alone (in eval mode; BatchNorm batch statistics are shared in training).
    """

    def __init__(
        self,
        config: str | dict = "scannet",
        *,
        use_decoder: tuple[bool, ...] | bool = False,
        refine: str | None = None,
        refine_detach: bool = False,
        relative_xyz: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        cfg = _check_config(config)
        self.config = cfg
        blocks = len(cfg["npoint"])
        decoders = (use_decoder,) * blocks if isinstance(use_decoder, bool) else tuple(use_decoder)
        if len(decoders) != blocks:
            raise ValueError(f"use_decoder must be a bool or one per block ({blocks}), got {len(decoders)}")
        self.backend = backend
        self.feature_conv = nn.Conv1d(cfg["in_channels"], cfg["d_model"][0], 1)
        self.blocks = nn.ModuleList()
        for i in range(blocks):
            refiner = CoordinateRefinement(refine, detach=refine_detach, backend=backend) if refine else None
            self.blocks.append(
                PointformerBlock(
                    cfg["npoint"][i],
                    cfg["radius"][i],
                    cfg["nsample"][i],
                    cfg["d_model"][i],
                    cfg["out_channels"][i],
                    cfg["nhead"],
                    prenorm=cfg["prenorm"],
                    local_drop=cfg["local_drop"],
                    global_drop=cfg["global_drop"],
                    use_decoder=decoders[i],
                    relative_xyz=relative_xyz,
                    refine=refiner,
                    backend=backend,
                )
            )
        self.fp_modules = nn.ModuleList()
        skip = list(cfg["out_channels"])
        prev = skip[-1]
        for i, channels in enumerate(cfg["fp_channels"]):
            self.fp_modules.append(PointFPModule((prev + skip[-2 - i], *channels), backend=backend))
            prev = channels[-1]

    def forward(self, points: torch.Tensor, lengths: torch.Tensor | None = None) -> dict:
        """B = 0 gives every output empty, with its shape."""
        check_tensor("points", points)
        if points.dim() != 3 or points.shape[-1] != 3 + self.config["in_channels"]:
            raise ValueError(f"points must be (B, N, 3 + {self.config['in_channels']}), got {tuple(points.shape)}")
        batch, n = points.shape[:2]
        first = self.config["npoint"][0]
        if n < first:
            raise ValueError(
                f"points has N = {n} points per cloud, fewer than the config's npoint[0] = {first} samples"
            )
        counts = check_lengths(lengths, batch, n, first)
        if batch == 0:
            return self._empty(points, n)
        xyz = points[..., :3].contiguous()
        features = self.feature_conv(points[..., 3:].transpose(1, 2))
        sa_xyz, sa_features = [xyz], [features]
        sa_indices = [torch.arange(n, device=points.device).expand(batch, n)]
        for i, block in enumerate(self.blocks):
            centers, feats, fps_idx = block(sa_xyz[-1], sa_features[-1], counts if i == 0 else None)
            sa_xyz.append(centers)
            sa_features.append(feats)
            sa_indices.append(sa_indices[-1].gather(1, fps_idx))
        fp_xyz, fp_features, fp_indices = [sa_xyz[-1]], [sa_features[-1]], [sa_indices[-1]]
        top = len(self.blocks)
        for i, fp in enumerate(self.fp_modules):
            target = top - i - 1
            fp_features.append(fp(sa_xyz[target], sa_xyz[target + 1], sa_features[target], fp_features[-1]))
            fp_xyz.append(sa_xyz[target])
            fp_indices.append(sa_indices[target])
        return dict(
            fp_xyz=fp_xyz,
            fp_features=fp_features,
            fp_indices=fp_indices,
            sa_xyz=sa_xyz,
            sa_features=sa_features,
            sa_indices=sa_indices,
        )

    def _empty(self, points: torch.Tensor, n: int) -> dict:
        """The outputs of a batch of no clouds: each of its shape, empty."""
        cfg = self.config
        sizes = [n, *cfg["npoint"]]
        widths = [cfg["d_model"][0], *cfg["out_channels"]]
        sa_xyz = [points.new_zeros((0, m, 3)) for m in sizes]
        sa_features = [points.new_zeros((0, c, m)) for c, m in zip(widths, sizes, strict=True)]
        sa_indices = [torch.zeros((0, m), dtype=torch.long, device=points.device) for m in sizes]
        top = len(self.blocks)
        fp_features = [sa_features[-1]] + [
            points.new_zeros((0, channels[-1], sizes[top - i - 1])) for i, channels in enumerate(cfg["fp_channels"])
        ]
        picks = [top - i for i in range(len(fp_features))]
        return dict(
            fp_xyz=[sa_xyz[t] for t in picks],
            fp_features=fp_features,
            fp_indices=[sa_indices[t] for t in picks],
            sa_xyz=sa_xyz,
            sa_features=sa_features,
            sa_indices=sa_indices,
        )
