"""Benchmark cases of token routing (issue 15), part 1: ToMe's matching at
N in {197, 577, 1025, 4096}, C = 64, against ToMe's own formulation (the
materialised N/2 x N/2 scores, written from its algorithm), with peak memory.
Floor: the matching's FLOPs (2 N_a N_b C) over the measured GEMM rate."""

from __future__ import annotations

import torch

from .. import ops
from ..reference import token_routing as ref
from .base import Case as _case
from .base import Impl as _impl

FAMILY = "token_routing"


def matching_setup(batch, n, c, r, device):
    g = torch.Generator().manual_seed(n)
    metric = torch.randn(batch, n, c, generator=g).to(device)
    ours = lambda: ops.bipartite_soft_matching(metric, r)  # noqa: E731
    tome = lambda: ref.bipartite_soft_matching(metric, r)  # noqa: E731
    if not all(torch.equal(a, b) for a, b in zip(ours(), tome(), strict=True)):
        raise AssertionError("bipartite_soft_matching disagrees with ToMe's formulation; refusing to time it")
    return [
        _impl("dynkernels", ours, "kernel", measure_memory=True),
        _impl("ToMe (materialised scores)", tome, "anchor", True, measure_memory=True),
    ]


def cases(size: str, device: str) -> list:
    shapes = (
        [(2, 65, 16, 8)]
        if size == "quick"
        else [(8, 197, 64, 16), (8, 577, 64, 16), (8, 1025, 64, 16), (2, 4096, 64, 16)]
    )
    out = []
    for b, n, c, r in shapes:
        na, nb = (n + 1) // 2, n // 2
        out.append(
            _case(
                FAMILY,
                "bipartite_soft_matching",
                f"B={b} N={n} C={c} r={r}",
                lambda a=(b, n, c, r): matching_setup(*a, device),
                dict(B=b, N=n, C=c, r=r),
                ("dynkernels", "ToMe (materialised scores)"),
                floor_flops=2 * b * na * nb * c,
            )
        )
    return out
