"""Shared test axes: devices, backends, dtypes, tolerances, seeds.

Triton kernels run on CPU under TRITON_INTERPRET=1, which must be set before
triton is imported, hence before dynkernels is.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dynkernels  # noqa: E402
from dynkernels._backends import usable_backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNEL_BACKENDS = ("cpp", "cuda", "triton")

# Value tolerances per dtype for ops that reorder arithmetic (sums, means).
# Index outputs are compared exactly; gathers are compared exactly.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def kernel_cases(supported: tuple[str, ...]) -> list:
    """(device, backend) pairs for every kernel backend usable here."""
    cases = []
    for device in DEVICES:
        for backend in usable_backends(device, supported):
            if backend in KERNEL_BACKENDS:
                marks = [pytest.mark.triton] if backend == "triton" else []
                cases.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return cases


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    info = dynkernels.info()
    return [
        f"dynkernels: extension built={info['extension']['built']} cuda_kernels={info['extension']['cuda_kernels']}",
        f"devices: {DEVICES}; triton {info['triton']['version']} interpret={info['triton']['interpret']}",
    ]
