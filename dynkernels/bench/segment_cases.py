"""Benchmark cases of the shared segment / scatter substrate at the sizes the
families use it: MoE combine (top-2 expert outputs summed back per token),
token merging (mean of merged tokens), ISDA's class-wise batch means, and a
point-set max pooling. Anchors: torch's own index_add_ / scatter_reduce
(the references)."""

from __future__ import annotations

import torch

from .. import ops, reference
from .base import Case as _case
from .base import Impl as _impl

FAMILY = "segment"


def _inputs(m: int, d: int, segments: int, device: str):
    g = torch.Generator().manual_seed(m + d + segments)
    src = torch.randn(m, d, generator=g).to(device)
    index = torch.randint(0, segments, (m,), generator=g).to(device)
    return src, index


def _check(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise AssertionError(f"{what}: dynkernels disagrees with torch; refusing to time a wrong kernel")


def scatter_add_setup(m: int, d: int, segments: int, device: str):
    src, index = _inputs(m, d, segments, device)
    kernel = lambda: ops.scatter_add(src, index, segments)
    ref = lambda: reference.scatter_add(src, index, segments)
    _check("scatter_add", kernel(), ref())
    return [_impl("dynkernels", kernel, "kernel"), _impl("torch index_add_", ref, "reference")]


def scatter_reduce_setup(m: int, d: int, segments: int, reduce: str, device: str):
    src, index = _inputs(m, d, segments, device)
    kernel = lambda: ops.scatter_reduce(src, index, segments, reduce)
    ref = lambda: reference.scatter_reduce(src, index, segments, reduce)
    _check(f"scatter_reduce {reduce}", kernel(), ref())
    return [_impl("dynkernels", kernel, "kernel"), _impl("torch scatter_reduce", ref, "reference")]


def cases(size: str, device: str) -> list:
    if size == "quick":
        adds = [("MoE combine", 2048, 256, 1024)]
        reduces = [("ToMe merge", 1576, 384, 800, "mean")]
    elif size == "default":
        adds = [("MoE combine T=8192 top-2 d=768", 16384, 768, 8192)]
        reduces = [
            ("ToMe merge B=64 N=197 r=98 d=768", 64 * 197, 768, 64 * 99, "mean"),
            ("point max-pool B=2 M=2048 ns=64 C=64", 2 * 2048 * 64, 64, 2 * 2048, "max"),
        ]
    else:
        adds = [
            ("MoE combine T=8192 top-2 d=768", 16384, 768, 8192),
            ("MoE combine T=32768 top-2 d=1024", 65536, 1024, 32768),
        ]
        reduces = [
            ("ToMe merge B=64 N=197 r=98 d=768", 64 * 197, 768, 64 * 99, "mean"),
            ("ISDA class means ImageNet N=256 C=1000 A=2048", 256, 2048, 1000, "mean"),
            ("point max-pool B=2 M=2048 ns=64 C=64", 2 * 2048 * 64, 64, 2 * 2048, "max"),
        ]
    out = []
    for label, m, d, s in adds:
        out.append(
            _case(
                FAMILY,
                "scatter_add",
                label,
                lambda m=m, d=d, s=s: scatter_add_setup(m, d, s, device),
                dict(M=m, D=d, S=s),
                ("dynkernels", "torch index_add_"),
                floor_bytes=m * d * 4 + m * 8 + s * d * 4,  # read the rows and indices, write the sums
            )
        )
    for label, m, d, s, reduce in reduces:
        out.append(
            _case(
                FAMILY,
                f"scatter_reduce {reduce}",
                label,
                lambda m=m, d=d, s=s, reduce=reduce: scatter_reduce_setup(m, d, s, reduce, device),
                dict(M=m, D=d, S=s, reduce=reduce),
                ("dynkernels", "torch scatter_reduce"),
                floor_bytes=m * d * 4 + m * 8 + s * d * 4,
            )
        )
    return out
