// ball_query, CPU.
//
// Args:   xyz (B, N, 3), centers (B, M, 3), both float32 or both float64;
//         0 <= min_radius < radius; num_samples ns >= 1.
// Returns (B, M, ns) int64. Point n is a hit of center m when d2 == 0 or
//         min_radius^2 <= d2 < radius^2 (d2 and the squared radii in the input
//         precision, radius cast to it first: mmcv's rule). The first ns hits in
//         index order are kept and the row is padded with the first hit; a
//         center with no hit gets a row of -1.
// Threads: parallel over B*M centers; each scans xyz (as SoA) in index order in
//         blocks whose hit masks vectorise, stopping at ns hits.
#include <ATen/Parallel.h>

#include <vector>

#include "common/checks.h"
#include "pointops/fps_tree.h"

namespace {

constexpr int64_t kScanBlock = 64;

template <typename T>
void ball_query_cloud_range(const T* px, const T* py, const T* pz, int64_t n, const T* centers, int64_t begin,
                            int64_t end, T min_r2, T r2, int64_t ns, int64_t* out) {
  uint8_t hit[kScanBlock];
  for (int64_t m = begin; m < end; ++m) {
    const T cx = centers[3 * m], cy = centers[3 * m + 1], cz = centers[3 * m + 2];
    int64_t* row = out + m * ns;
    int64_t count = 0;
    for (int64_t block = 0; block < n && count < ns; block += kScanBlock) {
      const int64_t len = std::min(kScanBlock, n - block);
      for (int64_t j = 0; j < len; ++j) {
        const T d = dynkernels::fps::sq_dist(px[block + j], py[block + j], pz[block + j], cx, cy, cz);
        hit[j] = (d == T(0)) | ((d >= min_r2) & (d < r2));
      }
      for (int64_t j = 0; j < len && count < ns; ++j) {
        if (hit[j]) row[count++] = block + j;
      }
    }
    const int64_t pad = count == 0 ? -1 : row[0];
    for (int64_t k = count; k < ns; ++k) row[k] = pad;
  }
}

at::Tensor ball_query_cpu(const at::Tensor& xyz, const at::Tensor& centers, double min_radius, double radius,
                          int64_t num_samples) {
  DK_CHECK_CPU(xyz);
  DK_CHECK_CPU(centers);
  DK_CHECK_POINTS(xyz);
  DK_CHECK_POINTS(centers);
  TORCH_CHECK(xyz.scalar_type() == centers.scalar_type(), "xyz and centers must share a dtype");
  TORCH_CHECK(xyz.size(0) == centers.size(0), "xyz and centers must share the batch size");
  TORCH_CHECK(num_samples >= 1, "num_samples must be >= 1, got ", num_samples);
  TORCH_CHECK(radius > 0 && min_radius >= 0 && min_radius < radius, "need 0 <= min_radius < radius");
  const int64_t batch = xyz.size(0), n = xyz.size(1), m = centers.size(1);
  at::Tensor out = at::empty({batch, m, num_samples}, xyz.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  at::Tensor soa = xyz.transpose(1, 2).contiguous();  // (B, 3, N): unit-stride coordinates
  at::Tensor ctr = centers.contiguous();
  int64_t* out_ptr = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(xyz.scalar_type(), "ball_query_cpu", [&] {
    const scalar_t r = static_cast<scalar_t>(radius), rmin = static_cast<scalar_t>(min_radius);
    const scalar_t r2 = r * r, min_r2 = rmin * rmin;
    const scalar_t* pts = soa.const_data_ptr<scalar_t>();
    const scalar_t* c = ctr.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch * m, 16, [&](int64_t begin, int64_t end) {
      while (begin < end) {
        const int64_t b = begin / m;
        const int64_t stop = std::min(end, (b + 1) * m);
        const scalar_t* base = pts + b * 3 * n;
        ball_query_cloud_range<scalar_t>(base, base + n, base + 2 * n, n, c + b * m * 3, begin - b * m,
                                         stop - b * m, min_r2, r2, num_samples, out_ptr + b * m * num_samples);
        begin = stop;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) { m.impl("ball_query", &ball_query_cpu); }
