"""Benchmark cases of Pointformer: the backbone at the SUN RGB-D and ScanNet
sizes (dynkernels path vs the official formulation, time, peak memory and a
per-stage breakdown), and its ops: the fused local attention against
materialised attention and torch's SDPA, and the coordinate refinement. The
neighbour ops it uses (knn, three_interpolate) are the pointops family's
(pointops_neighbors_cases.py)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .. import ops, reference
from ..nn import CONFIGS, PointformerBackbone
from ..testing import random_cloud
from .base import Case as _case
from .base import Impl as _impl
from .base import quiet_profiler

FAMILY = "pointformer"

STAGES = (
    "sampling",
    "grouping",
    "local_attention",
    "refinement",
    "local_global_attention",
    "global_attention",
    "feature_propagation",
)


def scene_points(batch: int, n: int, device: str) -> torch.Tensor:
    """(B, N, 4): a synthetic indoor scan plus VoteNet's height feature."""
    g = torch.Generator().manual_seed(4321 + n + batch)
    xyz = random_cloud(batch, n, kind="scene", generator=g)
    height = xyz[..., 2:] - xyz[..., 2:].amin(dim=1, keepdim=True)
    return torch.cat([xyz, height], dim=-1).to(device)


def backbone_pair(config: str, device: str, refine: str | None = None):
    """(dynkernels path, reference path): one model, two copies, equal parameters."""
    torch.manual_seed(0)
    kernel = PointformerBackbone(config, refine=refine).to(device)
    ref = copy.deepcopy(kernel)
    for module in ref.modules():
        if hasattr(module, "backend"):
            module.backend = "reference"
    return kernel, ref


def check_backbones(kernel, ref, points) -> None:
    """Eval-mode outputs must match before anything is timed: indices exactly,
    features within float32 summation-order noise."""
    kernel.eval(), ref.eval()
    with torch.no_grad():
        got, want = kernel(points), ref(points)
    for a, b in zip(got["fp_indices"], want["fp_indices"], strict=True):
        if not torch.equal(a, b):
            raise AssertionError("backbone: seed indices differ from the reference path; refusing to time")
    for a, b in zip(got["fp_features"], want["fp_features"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def stage_times(model, points) -> dict[str, float]:
    """Seconds per forward stage (record_function labels), from one profiled eval forward."""
    with (
        quiet_profiler(),
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        model(points)
    totals = {name: 0.0 for name in STAGES}
    for event in prof.key_averages():
        if event.key.startswith("pointformer."):
            totals[event.key.split(".", 1)[1]] += event.cpu_time_total / 1e6
    return {k: v for k, v in totals.items() if v > 0}


def backbone_setup(config: str, batch: int, n: int, device: str, backward: bool):
    points = scene_points(batch, n, device)
    kernel, ref = backbone_pair(config, device)
    check_backbones(kernel, ref, points)
    impls = []
    for name, model, kind in (("dynkernels", kernel, "kernel"), ("reference", ref, "reference")):
        if backward:
            model.train()

            def run(model=model):
                out = model(points)
                loss = out["fp_features"][-1].square().mean() + out["fp_xyz"][-1].square().mean()
                loss.backward()
                model.zero_grad(set_to_none=True)
                return loss.detach()

            impls.append(_impl(name, run, kind, None, "train mode (dropout on)", measure_memory=True))
        else:
            model.eval()

            def run(model=model):
                with torch.no_grad():
                    return model(points)["fp_features"][-1]

            stages = stage_times(model, points) if device == "cpu" else None
            impls.append(_impl(name, run, kind, True, "eval mode", measure_memory=True, stages=stages))
    return impls


def attention_setup(groups: int, heads: int, s: int, d: int, device: str, backward: bool):
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(groups, s, 3 * heads * d, generator=g).to(device).requires_grad_(backward)
    rows = torch.randint(0, s, (groups,), generator=g).to(device)

    def split(t):
        return t.view(groups, s, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)

    def ours():
        return ops.local_attention_packed(qkv, heads, row_index=rows)

    def materialised():  # what nn.MultiheadAttention(need_weights=True) computes and stores
        out, w = reference.local_attention(*split(qkv), rows)
        return out.transpose(1, 2).reshape(groups, s, heads * d), w

    def sdpa():  # torch's fused attention, no centroid row
        q, k, v = split(qkv)
        return F.scaled_dot_product_attention(q, k, v, scale=math.sqrt(1.0 / d)).transpose(1, 2).reshape(
            groups, s, heads * d
        ), None

    got, want = ours(), materialised()
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    same_sdpa = bool(torch.allclose(sdpa()[0], want[0], rtol=1e-4, atol=1e-5))
    fns = [("dynkernels", ours, "kernel", None), ("reference", materialised, "reference", None)]
    fns.append(("torch SDPA (no weights)", sdpa, "anchor", same_sdpa))
    impls = []
    for name, fn, kind, agrees in fns:
        if backward:

            def run(fn=fn):
                out, w = fn()
                loss = out.square().sum() + (w.sum() if w is not None else 0.0)
                (grad,) = torch.autograd.grad(loss, qkv)
                return grad

            impls.append(_impl(name, run, kind, agrees, measure_memory=True))
        else:

            def run(fn=fn):
                with torch.no_grad():
                    return fn()[0]

            impls.append(_impl(name, run, kind, agrees, measure_memory=True))
    return impls


def refinement_setup(batch: int, m: int, s: int, device: str):
    g = torch.Generator().manual_seed(13)
    attn = torch.rand(batch, m, 1, s, s, generator=g).to(device).softmax(-1)  # MHA's head-averaged maps
    grouped = torch.rand(batch, 3, m, s, generator=g).to(device)
    rows = torch.randint(-1, s, (batch, m), generator=g).to(device)
    kernel = lambda: ops.coordinate_refinement(attn, grouped, row=rows)
    ref = lambda: reference.coordinate_refinement(attn, grouped, rows)
    torch.testing.assert_close(kernel(), ref())
    return [_impl("dynkernels", kernel, "kernel"), _impl("reference", ref, "reference")]


def _names(op: str, device: str) -> tuple[str, ...]:
    names = ["dynkernels", "reference"]
    if op.startswith("local_attention"):
        names.append("torch SDPA (no weights)")
    return tuple(names)


def cases(size: str, device: str) -> list:
    if size == "quick":
        backbones = [("sunrgbd", 1, 4000)]
        attention = [(512, 8, 64, 8)]
    elif size == "default":  # one SUN RGB-D scene (B=1) and its block 0's attention shape
        backbones = [("sunrgbd", 1, CONFIGS["sunrgbd"]["cloud_points"])]
        attention = [(2048, 8, 64, 8)]
    else:
        backbones = [
            ("sunrgbd", 2, CONFIGS["sunrgbd"]["cloud_points"]),
            ("scannet", 2, CONFIGS["scannet"]["cloud_points"]),
        ]
        attention = [(4096, 8, 64, 8), (2048, 8, 32, 16)]
    out = []
    for config, b, n in backbones:
        for backward in (False, True):
            op = "pointformer backbone" + (" fwd+bwd" if backward else " fwd")
            out.append(
                _case(
                    "pointformer",
                    op,
                    f"{config} B={b} N={n}",
                    lambda c=config, b=b, n=n, bw=backward: backbone_setup(c, b, n, device, bw),
                    dict(config=config, B=b, N=n),
                    _names(op, device),
                )
            )
    for groups, heads, s, d in attention:
        for backward in (False, True):
            op = "local_attention" + (" fwd+bwd" if backward else "")
            out.append(
                _case(
                    "pointformer",
                    op,
                    f"G={groups} H={heads} S={s} D={d}",
                    lambda g=groups, h=heads, s=s, d=d, bw=backward: attention_setup(g, h, s, d, device, bw),
                    dict(G=groups, H=heads, S=s, D=d),
                    _names(op, device),
                    # Q K^T and P V (the backward: four such products)
                    floor_flops=4 * groups * heads * s * s * d * (3 if backward else 1),
                )
            )
    out.append(
        _case(
            "pointformer",
            "coordinate_refinement",
            "B=2 M=2048 S=64 (MHA maps)",
            lambda: refinement_setup(2, 2048, 64, device),
            dict(B=2, M=2048, S=64),
            _names("coordinate_refinement", device),
            floor_bytes=2 * 2048 * 64 * 4 * 4 + 2 * 2048 * 20,  # one attention row and the group's xyz, per center
        )
    )
    return out
