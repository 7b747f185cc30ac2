"""pytest-benchmark suites: `python -m pytest benchmarks --benchmark-only`.

They time the same cases as `python -m dynkernels bench` (dynkernels.bench),
grouped per op and size; every case checks dynkernels against its reference
before anything is timed. DYNKERNELS_BENCH_SIZE=quick|default|full picks the
size tier (default: default).
"""

import os

import pytest
import torch

from dynkernels.bench import cases_for
from dynkernels.bench.runner import peak_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = os.environ.get("DYNKERNELS_BENCH_SIZE", "default")

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


def case_params(family: str) -> list:
    """pytest params (case, implementation name) for one family's cases."""
    return [
        pytest.param(case, name, id=f"{case.op}|{case.size}|{name}")
        for case in cases_for([family], None, SIZE, DEVICE)
        for name in case.impl_names
    ]


def run_case(benchmark, case, impl_name):
    """Times one implementation of a case (whose setup checked it against the
    reference), with its parameters, peak memory and stages in extra_info."""
    impl = impls_of(case)[impl_name]
    benchmark.group = f"{case.op} {case.size}"
    benchmark.extra_info.update(case.params, kind=impl.kind, agrees=impl.agrees, device=DEVICE, note=impl.note)
    if impl.measure_memory:
        benchmark.extra_info["peak_mb"] = peak_bytes(impl.fn, DEVICE) / 2**20
    if impl.stages:
        benchmark.extra_info["stages_ms"] = {k: v * 1e3 for k, v in impl.stages.items()}
    return timed(benchmark, impl.fn)
