"""Benchmark cases: what to run, at which sizes, against which anchors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import pointops_cases


@dataclass
class Impl:
    """One way to compute a case. kind: "kernel", "reference" or "anchor".
    `agrees` says whether its output matched dynkernels (None: not comparable)."""

    name: str
    fn: Callable[[], Any]
    kind: str
    agrees: bool | None = None
    note: str = ""


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


FAMILIES: dict[str, Callable[[bool, str], list[Case]]] = {"pointops": pointops_cases.cases}


def cases_for(families: list[str] | None, ops: list[str] | None, quick: bool, device: str) -> list[Case]:
    out = []
    for family, make in FAMILIES.items():
        if families and family not in families:
            continue
        out += [c for c in make(quick, device) if not ops or c.op in ops or family in ops]
    return out
