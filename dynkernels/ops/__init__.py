"""Public functional API, one module per op family."""

from .evolving_attention import evolve_attention_logits, evolving_attention
from .isda import (
    isda_consistency_loss,
    isda_cross_entropy,
    isda_cross_entropy_per_sample,
    isda_update,
    isda_update_,
)
from .pointformer import centroid_row_index, coordinate_refinement, local_attention, local_attention_packed
from .pointops import ball_query, furthest_point_sample, gather_points, grouping_operation
from .pointops_neighbors import knn, three_interpolate, three_nn

__all__ = [
    "ball_query",
    "centroid_row_index",
    "coordinate_refinement",
    "evolve_attention_logits",
    "evolving_attention",
    "furthest_point_sample",
    "gather_points",
    "grouping_operation",
    "isda_consistency_loss",
    "isda_cross_entropy",
    "isda_cross_entropy_per_sample",
    "isda_update",
    "isda_update_",
    "knn",
    "local_attention",
    "local_attention_packed",
    "three_interpolate",
    "three_nn",
]
