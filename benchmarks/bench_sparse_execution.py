"""Spatially sparse execution: mask compaction and the pixel gather / scatter
against DynConv's nonzero path and torch's index_select / index_add_.
Groups are "<op> <size>"."""

import pytest
from conftest import case_params, run_case


@pytest.mark.parametrize("case,impl_name", case_params("sparse_execution"))
def test_sparse_execution(benchmark, case, impl_name):
    assert run_case(benchmark, case, impl_name) is not None
