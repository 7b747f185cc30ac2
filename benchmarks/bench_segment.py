"""The shared segment / scatter substrate against torch's index_add_ and
scatter_reduce at the families' sizes (MoE combine, token merging, point
max-pooling). Groups are "<op> <size>"."""

import pytest
from conftest import case_params, run_case


@pytest.mark.parametrize("case,impl_name", case_params("segment"))
def test_segment(benchmark, case, impl_name):
    assert run_case(benchmark, case, impl_name) is not None
