"""Family discovery: ``dynkernels.ops``, ``.reference`` and ``.nn`` export what
their family modules list in ``__all__``, so a new family adds its own files
and no central import list."""

from __future__ import annotations

import importlib
import pkgutil
import sys


def export_family_modules(package: str, namespace: dict) -> list[str]:
    """Import every public submodule of `package` (names not starting with
    "_"), in name order, and copy each one's ``__all__`` into `namespace`
    (the package's globals). Two modules exporting one name is an error."""
    owners: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(sys.modules[package].__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for name in getattr(module, "__all__", ()):
            if name in owners:
                raise ImportError(f"{package}: {name!r} is exported by both {owners[name]} and {info.name}")
            owners[name] = info.name
            namespace[name] = getattr(module, name)
    return sorted(owners)
