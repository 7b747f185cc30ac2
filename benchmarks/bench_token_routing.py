"""Token routing: ToMe's matching against its materialised-scores formulation.
Groups are "<op> <size>"."""

import pytest
from conftest import case_params, run_case


@pytest.mark.parametrize("case,impl_name", case_params("token_routing"))
def test_token_routing(benchmark, case, impl_name):
    assert run_case(benchmark, case, impl_name) is not None
