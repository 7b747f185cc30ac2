"""Benchmark cases: what to run, at which sizes, against which anchors."""

from __future__ import annotations

from collections.abc import Callable

from . import evolving_attention_cases, isda_cases, pointformer_cases, pointops_cases
from .base import Case, Impl

__all__ = ["FAMILIES", "Case", "Impl", "cases_for"]


FAMILIES: dict[str, Callable[[bool, str], list[Case]]] = {
    "pointops": pointops_cases.cases,
    "pointformer": pointformer_cases.cases,
    "evolving_attention": evolving_attention_cases.cases,
    "isda": isda_cases.cases,
}


def cases_for(families: list[str] | None, ops: list[str] | None, quick: bool, device: str) -> list[Case]:
    out = []
    for family, make in FAMILIES.items():
        if families and family not in families:
            continue
        out += [c for c in make(quick, device) if not ops or c.op in ops or family in ops]
    return out
