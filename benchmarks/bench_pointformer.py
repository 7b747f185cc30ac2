"""Pointformer: the backbone (dynkernels path vs the official formulation) at
the SUN RGB-D and ScanNet sizes, forward and forward+backward, and its ops
against their references and anchors (Open3D's KD-tree, torch SDPA). Groups
are "<op> <size>"; peak memory and the per-stage breakdown are stored in
extra_info."""

import pytest
from conftest import case_params, run_case


@pytest.mark.parametrize("case,impl_name", case_params("pointformer"))
def test_pointformer(benchmark, case, impl_name):
    assert run_case(benchmark, case, impl_name) is not None
