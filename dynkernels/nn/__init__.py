"""nn.Module wrappers: parameters and configuration only, the math lives in
dynkernels.ops. Every family module's ``__all__`` (nn/<family>*.py) is exported here."""

from .._families import export_family_modules

__all__ = export_family_modules(__name__, globals())
