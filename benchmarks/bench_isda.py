"""ISDA: one training step's ISDA work (estimator update + augmented loss
forward + backward), dynkernels against the official formulation, at the
CIFAR (full covariance), ImageNet and Cityscapes (diagonal) sizes. Groups are
"<op> <size>"; the peak memory of one call is stored in extra_info."""

import pytest
from conftest import case_params, run_case


@pytest.mark.parametrize("case,impl_name", case_params("isda"))
def test_isda(benchmark, case, impl_name):
    assert run_case(benchmark, case, impl_name) is not None
