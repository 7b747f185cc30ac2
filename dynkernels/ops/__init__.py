"""Public functional API, one module per op family."""

from .pointops import ball_query, furthest_point_sample, gather_points, grouping_operation

__all__ = ["ball_query", "furthest_point_sample", "gather_points", "grouping_operation"]
