"""Pure-PyTorch references: readable, faithful to the documented semantics,
and the yardstick every kernel is tested against."""

from .pointops import ball_query, furthest_point_sample, gather_points, grouping_operation

__all__ = ["ball_query", "furthest_point_sample", "gather_points", "grouping_operation"]
