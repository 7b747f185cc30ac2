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
KERNEL_BACKENDS = ("cpp", "cuda", "triton", "composite")
DTYPES = (torch.float32, torch.float64)  # what every CPU kernel takes
GRAD_DTYPES = (torch.float64,)  # gradcheck
HALF_DTYPES = (torch.float16, torch.bfloat16)  # GPU kernels (float32 arithmetic)

# Value tolerances per dtype for ops that reorder arithmetic (sums, means).
# Index outputs are compared exactly; gathers are compared exactly.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def kernel_cases(op: str) -> list:
    """(device, backend) pairs for every kernel backend of registered op `op`
    usable here (the registry says which backends the op has)."""
    cases = []
    for device in DEVICES:
        for backend in usable_backends(op, device):
            if backend in KERNEL_BACKENDS:
                marks = [pytest.mark.triton] if backend == "triton" else []
                cases.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return cases


# The two-times rule's absolute floor: torch's own error can be exactly 0 (a
# sum of exactly representable terms, a gather), where a kernel that sums in
# another order legitimately rounds once; 1e-6 is a few float32 ulps at the
# unit scale of these tests' values, far under any bug's size.
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}


def assert_close_to_float64(kernel: torch.Tensor, torch_same_dtype: torch.Tensor, float64_ref: torch.Tensor) -> None:
    """The two-times rule: the kernel's largest error against the float64
    reference is at most twice that of torch (the reference run in the
    kernel's dtype), plus ERROR_FLOOR."""
    for name, t in (("kernel", kernel), ("torch_same_dtype", torch_same_dtype)):
        if t.shape != float64_ref.shape:
            raise AssertionError(f"{name} has shape {tuple(t.shape)}, the float64 reference {tuple(float64_ref.shape)}")
    truth = float64_ref.double()
    ours = (kernel.double() - truth).abs().max().item()
    theirs = (torch_same_dtype.double() - truth).abs().max().item()
    floor = ERROR_FLOOR[kernel.dtype]
    assert ours <= 2 * theirs + floor, f"error {ours:.3g} > 2 x torch's {theirs:.3g} + {floor:g} ({kernel.dtype})"


def bad_input_params(rows) -> list:
    """pytest params from a bad-input table of (name, call, error, match) rows."""
    return [pytest.param(call, error, match, id=name) for name, call, error, match in rows]


def assert_clear_error(call, error, match) -> None:
    """call() raises `error` whose message matches `match` (it names the argument)."""
    with pytest.raises(error, match=match):
        call()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    info = dynkernels.info()
    return [
        f"dynkernels: extension built={info['extension']['built']} cuda_kernels={info['extension']['cuda_kernels']}",
        f"devices: {DEVICES}; triton {info['triton']['version']} interpret={info['triton']['interpret']}",
    ]
