"""Benchmark cases of the pointops family's neighbour ops: kNN against
Open3D's KD-tree, and the three-NN interpolation of feature propagation."""

from __future__ import annotations

import numpy as np
import torch

from .. import ops, reference
from ..testing import random_cloud
from .base import Case as _case
from .base import Impl as _impl
from .base import have as _have

FAMILY = "pointops"


def knn_setup(batch: int, n: int, m: int, k: int, device: str):
    g = torch.Generator().manual_seed(99)
    xyz = random_cloud(batch, n, kind="scene", generator=g).to(device)
    centers = xyz[:, torch.randperm(n, generator=g)[:m]].contiguous()
    kernel = lambda: ops.knn(xyz, centers, k)
    ref = lambda: reference.knn(xyz, centers, k)
    got, want = kernel(), ref()
    if not (torch.equal(got[1].cpu(), want[1].cpu()) and torch.equal(got[0].cpu(), want[0].cpu())):
        raise AssertionError("knn: dynkernels disagrees with the reference; refusing to time a wrong kernel")
    impls = [_impl("dynkernels", kernel, "kernel"), _impl("reference", ref, "reference")]
    if device == "cpu" and _have("open3d"):
        import open3d as o3d

        pts = [c.double().numpy() for c in xyz]
        ctr = [c.double().numpy() for c in centers]

        def kd_search():  # tree build included: a user has to build it
            out = []
            for p, cs in zip(pts, ctr, strict=True):
                tree = o3d.geometry.KDTreeFlann(o3d.geometry.PointCloud(o3d.utility.Vector3dVector(p)))
                out.append([tree.search_knn_vector_3d(c, k)[1] for c in cs])
            return out

        found = kd_search()
        same = all(
            set(np.asarray(f).tolist()) == set(r.tolist())
            for rows_f, rows_r in zip(found, got[1].cpu(), strict=True)
            for f, r in zip(rows_f, rows_r, strict=True)
        )
        impls.append(_impl("open3d KDTree knn", kd_search, "anchor", same, "same neighbour sets"))
    return impls


def interpolate_setup(batch: int, channels: int, m: int, n: int, device: str):
    g = torch.Generator().manual_seed(11)
    source = random_cloud(batch, m, generator=g).to(device)
    target = random_cloud(batch, n, generator=g).to(device)
    features = torch.randn(batch, channels, m, generator=g).to(device)
    dist, idx = ops.three_nn(target, source)
    recip = 1.0 / (dist + 1e-8)
    weight = recip / recip.sum(-1, keepdim=True)
    kernel = lambda: ops.three_interpolate(features, idx, weight)
    ref = lambda: reference.three_interpolate(features, idx, weight)
    torch.testing.assert_close(kernel(), ref())
    return [_impl("dynkernels", kernel, "kernel"), _impl("reference", ref, "reference")]


def cases(size: str, device: str) -> list:
    knn_sizes = {
        "quick": [(2, 8192, 512, 16)],
        "default": [(2, 40000, 2048, 16)],
        "full": [(2, 40000, 2048, 16), (8, 16384, 1024, 32)],
    }[size]
    out = []
    for b, n, m, k in knn_sizes:
        names = ("dynkernels", "reference") + (("open3d KDTree knn",) if device == "cpu" and _have("open3d") else ())
        out.append(
            _case(
                "pointops",
                "knn",
                f"B={b} N={n} M={m} k={k}",
                lambda b=b, n=n, m=m, k=k: knn_setup(b, n, m, k, device),
                dict(B=b, N=n, M=m, k=k),
                names,
                floor_bytes=(b * n + b * m) * 12 + b * m * k * 12,  # points in; (d2, idx) out
            )
        )
    out.append(
        _case(
            "pointops",
            "three_interpolate",
            "B=2 C=256 m=512 n=1024",
            lambda: interpolate_setup(2, 256, 512, 1024, device),
            dict(B=2, C=256, m=512, n=1024),
            ("dynkernels", "reference"),
            floor_bytes=2 * 256 * 512 * 4 + 2 * 1024 * 3 * 12 + 2 * 256 * 1024 * 4,
        )
    )
    return out
