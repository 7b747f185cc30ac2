"""Pure-PyTorch references: readable, faithful to the documented semantics,
and the yardstick every kernel is tested against. Every family module's
``__all__`` (reference/<family>.py) is exported here."""

from .._families import export_family_modules

__all__ = export_family_modules(__name__, globals())
