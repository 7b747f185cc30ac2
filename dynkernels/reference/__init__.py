"""Pure-PyTorch references: readable, faithful to the documented semantics,
and the yardstick every kernel is tested against."""

from .evolving_attention import evolve_attention_logits, evolving_attention
from .pointformer import coordinate_refinement, head_averaged_row, local_attention
from .pointops import (
    ball_query,
    furthest_point_sample,
    gather_points,
    grouping_operation,
    knn,
    three_interpolate,
    three_nn,
)

__all__ = [
    "ball_query",
    "coordinate_refinement",
    "evolve_attention_logits",
    "evolving_attention",
    "furthest_point_sample",
    "gather_points",
    "grouping_operation",
    "head_averaged_row",
    "knn",
    "local_attention",
    "three_interpolate",
    "three_nn",
]
