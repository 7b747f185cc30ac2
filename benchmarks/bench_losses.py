"""Fused training losses: FDIT's frequency pixel and spectral losses and Auto
Seg-Loss's surrogates (forward
+ backward) against the official formulations and kornia. Groups are
"<op> <size>"."""

import pytest
from conftest import case_params, run_case


@pytest.mark.parametrize("case,impl_name", case_params("fdit"))
def test_fdit(benchmark, case, impl_name):
    assert run_case(benchmark, case, impl_name) is not None


@pytest.mark.parametrize("case,impl_name", case_params("auto_seg_loss"))
def test_auto_seg_loss(benchmark, case, impl_name):
    assert run_case(benchmark, case, impl_name) is not None
