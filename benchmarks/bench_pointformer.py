"""Pointformer: the backbone (dynkernels path vs the official formulation) at
the SUN RGB-D and ScanNet sizes, forward and forward+backward, and its ops
against their references and anchors (Open3D's KD-tree, torch SDPA). Groups
are "<op> <size>"; peak memory and the per-stage breakdown are stored in
extra_info."""

import pytest
from conftest import DEVICE, QUICK, impls_of, timed

from dynkernels.bench import cases_for
from dynkernels.bench.runner import peak_bytes

CASES = cases_for(["pointformer"], None, QUICK, DEVICE)
PARAMS = [pytest.param(case, name, id=f"{case.op}|{case.size}|{name}") for case in CASES for name in case.impl_names]


@pytest.mark.parametrize("case,impl_name", PARAMS)
def test_pointformer(benchmark, case, impl_name):
    impl = impls_of(case)[impl_name]  # setup asserted dynkernels == reference
    benchmark.group = f"{case.op} {case.size}"
    benchmark.extra_info.update(case.params, kind=impl.kind, agrees=impl.agrees, device=DEVICE, note=impl.note)
    if impl.measure_memory:
        benchmark.extra_info["peak_mb"] = peak_bytes(impl.fn, DEVICE) / 2**20
    if impl.stages:
        benchmark.extra_info["stages_ms"] = {k: v * 1e3 for k, v in impl.stages.items()}
    result = timed(benchmark, impl.fn)
    assert result is not None
