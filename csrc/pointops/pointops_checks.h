// Argument checks of the point ops, shared by their CPU and CUDA glue (the
// device check stays with each backend).
#pragma once

#include "common/checks.h"

namespace dynkernels {
namespace pointops {

inline void check_fps_args(const at::Tensor& xyz, int64_t num_points, int64_t start_index) {
  DK_CHECK_POINTS(xyz);
  const int64_t n = xyz.size(1);
  TORCH_CHECK(num_points >= 0 && num_points <= n, "num_points must be in [0, N=", n, "], got ", num_points);
  TORCH_CHECK(num_points == 0 || (start_index >= 0 && start_index < n), "start_index must be in [0, N=", n,
              "), got ", start_index);
}

inline void check_ball_query_args(const at::Tensor& xyz, const at::Tensor& centers, double min_radius, double radius,
                                  int64_t num_samples) {
  DK_CHECK_POINTS(xyz);
  DK_CHECK_POINTS(centers);
  TORCH_CHECK(xyz.device() == centers.device(), "xyz and centers must be on one device");
  TORCH_CHECK(xyz.scalar_type() == centers.scalar_type(), "xyz and centers must share a dtype");
  TORCH_CHECK(xyz.size(0) == centers.size(0), "xyz and centers must share the batch size");
  TORCH_CHECK(num_samples >= 1, "num_samples must be >= 1, got ", num_samples);
  TORCH_CHECK(radius > 0 && min_radius >= 0 && min_radius < radius, "need 0 <= min_radius < radius");
}

// values: features (B, C, N) or grad_out (B, C, K); idx (B, K).
inline void check_gather_args(const at::Tensor& values, const at::Tensor& idx) {
  TORCH_CHECK(values.device() == idx.device(), "values and idx must be on one device");
  DK_CHECK_DIM(values, 3);
  DK_CHECK_DIM(idx, 2);
  DK_CHECK_INDEX_DTYPE(idx);
  TORCH_CHECK(values.size(0) == idx.size(0), "batch sizes differ: ", values.size(0), " vs ", idx.size(0));
}

inline void check_gather_backward_args(const at::Tensor& grad_out, const at::Tensor& idx, int64_t num_points) {
  check_gather_args(grad_out, idx);
  TORCH_CHECK(grad_out.size(2) == idx.size(1), "grad_out has ", grad_out.size(2), " columns, idx ", idx.size(1));
  TORCH_CHECK(num_points >= 0, "num_points must be >= 0, got ", num_points);
}

inline void check_knn_args(const at::Tensor& xyz, const at::Tensor& centers, int64_t k) {
  DK_CHECK_POINTS(xyz);
  DK_CHECK_POINTS(centers);
  TORCH_CHECK(xyz.device() == centers.device(), "xyz and centers must be on one device");
  TORCH_CHECK(xyz.scalar_type() == centers.scalar_type(), "xyz and centers must share a dtype");
  TORCH_CHECK(xyz.size(0) == centers.size(0), "xyz and centers must share the batch size");
  TORCH_CHECK(k >= 1 && k <= xyz.size(1), "k must be in [1, N=", xyz.size(1), "], got ", k);
}

// features (B, C, m) or grad_out (B, C, n); idx and weight (B, n, 3).
inline void check_interpolate_args(const at::Tensor& values, const at::Tensor& idx, const at::Tensor& weight) {
  TORCH_CHECK(values.device() == idx.device() && values.device() == weight.device(),
              "values, idx and weight must be on one device");
  DK_CHECK_DIM(values, 3);
  DK_CHECK_DIM(idx, 3);
  DK_CHECK_INDEX_DTYPE(idx);
  TORCH_CHECK(idx.size(2) == 3 && weight.sizes() == idx.sizes(), "idx and weight must be (B, n, 3), got ",
              idx.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == values.scalar_type(), "weight must have the features' dtype");
  TORCH_CHECK(values.size(0) == idx.size(0), "batch sizes differ: ", values.size(0), " vs ", idx.size(0));
}

// attn (B, M, H, R, S), grouped_xyz (B, 3, M, S), row_index (B, M) int64.
inline void check_refinement_args(const at::Tensor& attn, const at::Tensor& grouped_xyz, const at::Tensor& row_index) {
  DK_CHECK_DIM(attn, 5);
  DK_CHECK_DIM(grouped_xyz, 4);
  DK_CHECK_DIM(row_index, 2);
  TORCH_CHECK(attn.device() == grouped_xyz.device() && attn.device() == row_index.device(),
              "attn, grouped_xyz and row_index must be on one device");
  TORCH_CHECK(grouped_xyz.size(1) == 3, "grouped_xyz must be (B, 3, M, S), got ", grouped_xyz.sizes());
  TORCH_CHECK(attn.size(0) == grouped_xyz.size(0) && attn.size(1) == grouped_xyz.size(2) &&
                  attn.size(4) == grouped_xyz.size(3) && attn.size(2) >= 1,
              "attn must be (B, M, H, R, S) matching grouped_xyz ", grouped_xyz.sizes(), ", got ", attn.sizes());
  TORCH_CHECK(row_index.scalar_type() == at::kLong && row_index.size(0) == attn.size(0) &&
                  row_index.size(1) == attn.size(1),
              "row_index must be int64 (B, M), got ", row_index.scalar_type(), " ", row_index.sizes());
  TORCH_CHECK(attn.scalar_type() == grouped_xyz.scalar_type(), "attn and grouped_xyz must share a dtype");
}

}  // namespace pointops
}  // namespace dynkernels
