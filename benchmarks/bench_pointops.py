"""Point ops: dynkernels vs the reference and the anchors (Open3D, fpsample,
torch.gather), at the issue's sizes. Groups are "<op> <size>"."""

import pytest
from conftest import case_params, run_case


@pytest.mark.parametrize("case,impl_name", case_params("pointops"))
def test_pointops(benchmark, case, impl_name):
    assert run_case(benchmark, case, impl_name) is not None
