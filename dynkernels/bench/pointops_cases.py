"""Benchmark cases of the point ops, with the anchors named in the issue:
Open3D's exact FPS and KD-tree radius search, fpsample's exact and bucket
(QuickFPS) FPS, and torch.gather."""

from __future__ import annotations

import numpy as np
import torch

from .. import ops, reference
from ..testing import random_cloud
from .base import Case as _case
from .base import Impl as _impl
from .base import have as _have

FAMILY = "pointops"


def _cloud(batch: int, n: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + n + batch)
    return random_cloud(batch, n, kind="scene" if n >= 40000 else "uniform", device=device, generator=g)


def _require_equal(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.equal(got.cpu(), want.cpu()):
        raise AssertionError(f"{what}: dynkernels disagrees with the reference; refusing to time a wrong kernel")


def fps_setup(batch: int, n: int, m: int, device: str):
    xyz = _cloud(batch, n, device)
    kernel = lambda: ops.furthest_point_sample(xyz, m)
    ref = lambda: reference.furthest_point_sample(xyz, m)
    ours = kernel()
    _require_equal("furthest_point_sample", ours, ref())
    impls = [_impl("dynkernels", kernel, "kernel"), _impl("reference", ref, "reference")]
    if device == "cpu":
        pts = [c.numpy() for c in xyz]
        if _have("open3d"):
            import open3d as o3d

            clouds = [o3d.geometry.PointCloud(o3d.utility.Vector3dVector(p.astype(np.float64))) for p in pts]
            run = lambda: [c.farthest_point_down_sample(m) for c in clouds]
            got = run()
            same = all(
                np.array_equal(np.sort(np.asarray(d.points), 0), np.sort(p[i.numpy()].astype(np.float64), 0))
                for d, p, i in zip(got, pts, ours, strict=True)
            )
            impls.append(_impl("open3d", run, "anchor", same, "same point set"))
        if _have("fpsample"):
            import fpsample

            exact = lambda: [fpsample.fps_sampling(p, m, start_idx=0) for p in pts]
            bucket = lambda: [fpsample.bucket_fps_kdline_sampling(p, m, h=7, start_idx=0) for p in pts]
            for name, fn in (("fpsample exact", exact), ("fpsample QuickFPS h=7", bucket)):
                same = all(np.array_equal(r.astype(np.int64), i.numpy()) for r, i in zip(fn(), ours, strict=True))
                impls.append(_impl(name, fn, "anchor", same, "same sequence"))
    return impls


def ball_query_setup(batch: int, n: int, m: int, ns: int, radius: float, device: str):
    xyz = _cloud(batch, n, device)
    idx = ops.furthest_point_sample(xyz, m)
    centers = torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3)).contiguous()
    kernel = lambda: ops.ball_query(xyz, centers, radius, ns)
    ref = lambda: reference.ball_query(xyz, centers, radius, ns)
    ours = kernel()
    _require_equal("ball_query", ours, ref())
    impls = [_impl("dynkernels", kernel, "kernel"), _impl("reference", ref, "reference")]
    if device == "cpu" and _have("open3d"):
        import open3d as o3d

        pts = [c.numpy().astype(np.float64) for c in xyz]
        ctr = [c.numpy().astype(np.float64) for c in centers]

        def kd_search():  # tree build included: a user has to build it
            out = []
            for p, cs in zip(pts, ctr, strict=True):
                tree = o3d.geometry.KDTreeFlann(o3d.geometry.PointCloud(o3d.utility.Vector3dVector(p)))
                out.append([tree.search_hybrid_vector_3d(c, radius, ns)[1] for c in cs])
            return out

        got = kd_search()
        # KD search returns the nearest ns, not the first ns by index: compare
        # only the balls that hold fewer than ns points, as sets (our -1
        # padding of an empty ball is no point).
        same = all(
            set(np.asarray(h).tolist()) == set(r.tolist()) - {-1}
            for hits, rows in zip(got, ours, strict=True)
            for h, r in zip(hits, rows, strict=True)
            if len(h) < ns
        )
        impls.append(_impl("open3d KDTree hybrid", kd_search, "anchor", same, "same small balls"))
    return impls


def grouping_setup(batch: int, n: int, m: int, ns: int, channels: int, device: str, backward: bool):
    g = torch.Generator().manual_seed(7)
    features = torch.randn(batch, channels, n, generator=g).to(device)
    idx = torch.randint(0, n, (batch, m, ns), generator=g).to(device)
    if not backward:
        kernel = lambda: ops.grouping_operation(features, idx)
        ref = lambda: reference.grouping_operation(features, idx)
        gather = lambda: features.gather(2, idx.reshape(batch, 1, -1).expand(batch, channels, -1)).view(
            batch, channels, m, ns
        )
        _require_equal("grouping_operation", kernel(), ref())
        return [
            _impl("dynkernels", kernel, "kernel"),
            _impl("reference", ref, "reference"),
            _impl("torch.gather", gather, "anchor", bool(torch.equal(kernel(), gather())), "same values"),
        ]
    leaf = features.clone().requires_grad_()
    grad = torch.randn(batch, channels, m, ns, generator=g).to(device)

    def step(fn):
        def run():
            (out,) = torch.autograd.grad(fn(leaf, idx), leaf, grad)
            return out

        return run

    kernel = step(ops.grouping_operation)
    ref = step(reference.grouping_operation)
    torch.testing.assert_close(kernel(), ref())
    return [_impl("dynkernels", kernel, "kernel"), _impl("reference", ref, "reference")]


def _names(op: str, device: str) -> tuple[str, ...]:
    names = ["dynkernels", "reference"]
    if device == "cpu":
        if op == "furthest_point_sample":
            names += ["open3d"] * _have("open3d") + ["fpsample exact", "fpsample QuickFPS h=7"] * _have("fpsample")
        elif op == "ball_query":
            names += ["open3d KDTree hybrid"] * _have("open3d")
    if op == "grouping_operation":
        names.append("torch.gather")
    return tuple(names)


def cases(size: str, device: str) -> list:
    if size == "quick":
        fps_sizes = [(1, 20000, 512), (2, 8192, 256)]
        query_sizes = [(2, 8192, 256, 32, 0.2)]
        group_sizes = [(2, 8192, 256, 32, 32)]
    elif size == "default":  # ScanNet's first set-abstraction layer (B=2, N=40000)
        fps_sizes = [(2, 40000, 2048)]
        query_sizes = [(2, 40000, 2048, 64, 0.2)]
        group_sizes = [(2, 40000, 2048, 64, 64)]
    else:
        fps_sizes = [(1, 100000, 4096), (8, 16384, 1024), (2, 40000, 2048)]
        query_sizes = [(8, 16384, 1024, 32, 0.2), (2, 40000, 2048, 64, 0.2)]
        group_sizes = [(8, 16384, 1024, 32, 64), (2, 40000, 2048, 64, 64)]
        if device == "cuda":
            fps_sizes.append((16, 16384, 4096))
            query_sizes.append((16, 16384, 4096, 32, 0.2))
            group_sizes.append((16, 16384, 4096, 32, 64))
    out = []
    for b, n, m in fps_sizes:
        out.append(
            _case(
                "pointops",
                "furthest_point_sample",
                f"B={b} N={n} M={m}",
                lambda b=b, n=n, m=m: fps_setup(b, n, m, device),
                dict(B=b, N=n, M=m),
                _names("furthest_point_sample", device),
                floor_bytes=b * n * 12 + b * m * 8,  # read the points, write the indices
            )
        )
    for b, n, m, ns, r in query_sizes:
        out.append(
            _case(
                "pointops",
                "ball_query",
                f"B={b} N={n} M={m} ns={ns} r={r}",
                lambda b=b, n=n, m=m, ns=ns, r=r: ball_query_setup(b, n, m, ns, r, device),
                dict(B=b, N=n, M=m, ns=ns, r=r),
                _names("ball_query", device),
                floor_bytes=(b * n + b * m) * 12 + b * m * ns * 8,
            )
        )
    for b, n, m, ns, c in group_sizes:
        for backward in (False, True):
            op = "grouping_operation" + (" fwd+bwd" if backward else "")
            out.append(
                _case(
                    "pointops",
                    op,
                    f"B={b} C={c} N={n} M={m} ns={ns}",
                    lambda b=b, n=n, m=m, ns=ns, c=c, bw=backward: grouping_setup(b, n, m, ns, c, device, bw),
                    dict(B=b, C=c, N=n, M=m, ns=ns),
                    _names(op, device),
                    # fwd: read features and idx, write the groups; bwd: read the groups' grad, write features' grad
                    floor_bytes=(b * c * n * 4 + b * m * ns * 8 + b * c * m * ns * 4) * (2 if backward else 1),
                )
            )
    return out
