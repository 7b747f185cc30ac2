// furthest_point_sample, CPU.
//
// Args:   xyz (B, N, 3) float32/float64, any strides; num_points M in [0, N];
//         start_index in [0, N) (ignored when M == 0).
// Returns (B, M) int64: the exact FPS sequence of fps_tree.h (ties to the lowest
//         index, no repeats while M <= N, non-finite clouds handled densely).
// Threads: clouds run in parallel when B >= threads; a single large cloud is
//         split across threads instead (fps_tree.h: sample_pruned).
#include <ATen/Parallel.h>

#include "pointops/fps_tree.h"
#include "pointops/pointops_checks.h"

namespace {

at::Tensor furthest_point_sample_cpu(const at::Tensor& xyz, int64_t num_points, int64_t start_index) {
  DK_CHECK_CPU(xyz);
  dynkernels::pointops::check_fps_args(xyz, num_points, start_index);
  const int64_t batch = xyz.size(0), n = xyz.size(1);
  at::Tensor out = at::empty({batch, num_points}, xyz.options().dtype(at::kLong));
  if (batch == 0 || num_points == 0) return out;
  at::Tensor points = xyz.contiguous();
  int64_t* out_ptr = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "furthest_point_sample_cpu", [&] {
    const scalar_t* base = points.const_data_ptr<scalar_t>();
    const int threads = at::get_num_threads();
    auto one_cloud = [&](int64_t b, int cloud_threads) {
      dynkernels::fps::sample_cloud<scalar_t>(base + b * n * 3, n, num_points, start_index,
                                              out_ptr + b * num_points, cloud_threads);
    };
    if (batch >= threads || threads == 1 || at::in_parallel_region()) {
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) one_cloud(b, 1);
      });
    } else {
      for (int64_t b = 0; b < batch; ++b) one_cloud(b, threads);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) { m.impl("furthest_point_sample", &furthest_point_sample_cpu); }
