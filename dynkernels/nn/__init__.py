"""nn.Module wrappers: parameters and configuration only, the math lives in dynkernels.ops."""

from .pointops import QueryAndGroup

__all__ = ["QueryAndGroup"]
