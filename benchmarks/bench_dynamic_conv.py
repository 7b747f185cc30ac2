"""Dynamic convolution against timm's CondConv2d (groups=B), the official
ODConv formulation, the per-sample loop and a static conv of the same shape.
Groups are "<op> <size>"; the peak memory of one call is stored in extra_info."""

import pytest
from conftest import case_params, run_case


@pytest.mark.parametrize("case,impl_name", case_params("dynamic_conv"))
def test_dynamic_conv(benchmark, case, impl_name):
    assert run_case(benchmark, case, impl_name) is not None
