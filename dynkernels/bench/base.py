"""The records the benchmark cases are made of."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Impl:
    """One way to compute a case. kind: "kernel" (what dynkernels runs by default),
    "variant" (another dynkernels backend), "reference" or "anchor".
    `agrees` says whether its output matched dynkernels (None: not comparable)."""

    name: str
    fn: Callable[[], Any]
    kind: str
    agrees: bool | None = None
    note: str = ""
    measure_memory: bool = False  # also record the peak of allocations during one call
    stages: dict | None = None  # seconds per stage of one call, where the case breaks it down


# The main job's size tiers: "quick" (seconds, for tests), "default" (every
# family at a realistic size in a few minutes on 2 cores), "full" (every paper size).
SIZE_TIERS = ("quick", "default", "full")


@dataclass
class Case:
    """One op at one size. `setup()` builds the inputs and returns the impls;
    it must have checked the kernel against the reference (raising on a
    mismatch) before returning."""

    family: str
    op: str
    size: str
    setup: Callable[[], list[Impl]]
    params: dict = field(default_factory=dict)
    impl_names: tuple[str, ...] = ()  # what setup() returns, known without running it
    # The least work the op must do at this size: bytes it must move (inputs
    # read once, outputs written once) and multiply-add FLOPs it must do; the
    # runner turns them into a floor time with the machine's measured copy
    # bandwidth and GEMM rate. 0 where a model would not be honest.
    floor_bytes: float = 0.0
    floor_flops: float = 0.0


def have(module: str) -> bool:
    """Whether an optional anchor library is installed."""
    return importlib.util.find_spec(module) is not None


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Runs torch.profiler with the process's stderr (fd 2) sent to /dev/null:
    kineto prints a "USDT: ... profiler_start/stop" line per profiled call
    from C++, which no logging switch of torch 2.13 turns off."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
