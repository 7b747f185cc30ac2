"""Benchmark cases: what to run, at which sizes, against which anchors.

Every ``bench/<family>*_cases.py`` module names its ``FAMILY`` and has
``cases(size, device) -> list[Case]`` (size: one of base.SIZE_TIERS); they are found by name, so a new
family adds its module and no central list."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from .base import SIZE_TIERS, Case, Impl

__all__ = ["FAMILIES", "Case", "Impl", "cases_for"]


def _discover() -> dict[str, list[Callable[[bool, str], list[Case]]]]:
    families: dict[str, list] = {}
    for info in sorted(pkgutil.iter_modules(importlib.import_module(__package__).__path__), key=lambda m: m.name):
        if not info.name.endswith("_cases"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        families.setdefault(module.FAMILY, []).append(module.cases)
    return families


FAMILIES = _discover()


def cases_for(families: list[str] | None, ops: list[str] | None, size: str, device: str) -> list[Case]:
    if size not in SIZE_TIERS:
        raise ValueError(f"size must be one of {SIZE_TIERS}, got {size!r}")
    out = []
    for family, makers in FAMILIES.items():
        if families and family not in families:
            continue
        for make in makers:
            out += [c for c in make(size, device) if not ops or c.op in ops or family in ops]
    return out
