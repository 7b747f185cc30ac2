"""dynkernels: fast fused PyTorch kernels for dynamic networks, point clouds and
attention variants, each held to a pure-PyTorch reference.

    import dynkernels
    idx = dynkernels.ops.furthest_point_sample(xyz, 1024)
    dynkernels.info()      # what was built, which backends run here
"""

from . import (
    _extension,  # noqa: F401  (loads _C and its op schemas first)
    nn,
    ops,
    reference,
)
from ._extension import BackendUnavailableError
from .info import info
from .ops import ball_query, furthest_point_sample, gather_points, grouping_operation

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailableError",
    "ball_query",
    "furthest_point_sample",
    "gather_points",
    "grouping_operation",
    "info",
    "nn",
    "ops",
    "reference",
]
