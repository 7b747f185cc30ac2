"""ISDA: one training step's ISDA work (estimator update + augmented loss
forward + backward), dynkernels against the official formulation, at the
CIFAR (full covariance), ImageNet and Cityscapes (diagonal) sizes. Groups are
"<op> <size>"; the peak memory of one call is stored in extra_info."""

import pytest
from conftest import DEVICE, QUICK, impls_of, timed

from dynkernels.bench import cases_for
from dynkernels.bench.runner import peak_bytes

CASES = cases_for(["isda"], None, QUICK, DEVICE)
PARAMS = [pytest.param(case, name, id=f"{case.op}|{case.size}|{name}") for case in CASES for name in case.impl_names]


@pytest.mark.parametrize("case,impl_name", PARAMS)
def test_isda(benchmark, case, impl_name):
    impl = impls_of(case)[impl_name]  # setup asserted dynkernels == official
    benchmark.group = f"{case.op} {case.size}"
    benchmark.extra_info.update(case.params, kind=impl.kind, agrees=impl.agrees, device=DEVICE)
    if impl.measure_memory:
        benchmark.extra_info["peak_mb"] = peak_bytes(impl.fn, DEVICE) / 2**20
    result = timed(benchmark, impl.fn)
    assert result is not None
