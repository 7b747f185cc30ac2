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

}  // namespace pointops
}  // namespace dynkernels
