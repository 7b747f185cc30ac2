"""Public functional API: every family module's ``__all__`` (ops/<family>*.py).

Note: the op ``evolving_attention`` shares its name with its family's module;
here the name is the function (import the module as
``importlib.import_module("dynkernels.ops.evolving_attention")``).
"""

from .._families import export_family_modules

__all__ = export_family_modules(__name__, globals())
