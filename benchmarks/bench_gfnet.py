"""Early exit (GFNet, MSDNet budgets): the focus-patch crop against GFNet's
get_patch loop, kornia and a copy of the output; the budget calibration and
evaluation against the official loops; GFNet's real early exit against the
official full-T path and the ideal sum_k t_k(n_k). Groups are "<op> <size>"."""

import pytest
from conftest import case_params, run_case


@pytest.mark.parametrize("case,impl_name", case_params("early_exit"))
def test_early_exit(benchmark, case, impl_name):
    assert run_case(benchmark, case, impl_name) is not None
