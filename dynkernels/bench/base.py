"""The records the benchmark cases are made of."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Impl:
    """One way to compute a case. kind: "kernel", "reference" or "anchor".
    `agrees` says whether its output matched dynkernels (None: not comparable)."""

    name: str
    fn: Callable[[], Any]
    kind: str
    agrees: bool | None = None
    note: str = ""
    measure_memory: bool = False  # also record the peak of allocations during one call
    stages: dict | None = None  # seconds per stage of one call, where the case breaks it down


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


def have(module: str) -> bool:
    """Whether an optional anchor library is installed."""
    return importlib.util.find_spec(module) is not None
