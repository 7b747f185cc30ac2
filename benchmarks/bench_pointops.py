"""Point ops: dynkernels vs the reference and the anchors (Open3D, fpsample,
torch.gather), at the issue's sizes. Groups are "<op> <size>"."""

import pytest
from conftest import DEVICE, QUICK, impls_of, timed

from dynkernels.bench import cases_for

CASES = cases_for(["pointops"], None, QUICK, DEVICE)
PARAMS = [pytest.param(case, name, id=f"{case.op}|{case.size}|{name}") for case in CASES for name in case.impl_names]


@pytest.mark.parametrize("case,impl_name", PARAMS)
def test_pointops(benchmark, case, impl_name):
    impl = impls_of(case)[impl_name]  # setup asserted dynkernels == reference
    benchmark.group = f"{case.op} {case.size}"
    benchmark.extra_info.update(case.params, kind=impl.kind, agrees=impl.agrees, device=DEVICE)
    result = timed(benchmark, impl.fn)
    assert result is not None
