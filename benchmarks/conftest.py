"""pytest-benchmark suites: `python -m pytest benchmarks --benchmark-only`.

They time the same cases as `python -m dynkernels bench` (dynkernels.bench),
grouped per op and size; every case checks dynkernels against its reference
before anything is timed. DYNKERNELS_BENCH_QUICK=1 selects the small sizes.
"""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("DYNKERNELS_BENCH_QUICK", "0") == "1"

_SETUPS: dict = {}


def impls_of(case) -> dict:
    """Runs a case's setup (checks included) once per session."""
    key = (case.op, case.size)
    if key not in _SETUPS:
        _SETUPS[key] = {impl.name: impl for impl in case.setup()}
    return _SETUPS[key]


def timed(benchmark, fn):
    if DEVICE == "cuda":

        def run():
            out = fn()
            torch.cuda.synchronize()
            return out

        return benchmark.pedantic(run, warmup_rounds=1, rounds=20, iterations=1)
    return benchmark.pedantic(fn, warmup_rounds=1, rounds=5, iterations=1)


@pytest.fixture
def bench_device():
    return DEVICE
