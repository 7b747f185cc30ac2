// ball_query, CPU.
//
// Args:   xyz (B, N, 3), centers (B, M, 3), both float32 or both float64;
//         0 <= min_radius < radius; num_samples ns >= 1.
// Returns (B, M, ns) int64. Point n is a hit of center m when d2 == 0 or
//         min_radius^2 <= d2 < radius^2 (d2 and the squared radii in the input
//         precision, radius cast to it first: mmcv's rule). The first ns hits in
//         index order are kept and the row is padded with the first hit; a
//         center with no hit gets a row of -1.
// Threads: parallel over B*M centers. Two exact strategies, chosen per center:
//   scan: test points in index order in 64-point blocks (the hit masks
//         vectorise), stopping at ns hits: cheap when the ball is dense.
//   grid: each cloud is bucketed into cubic cells of side radius*1.001, every
//         cell holding its points in ascending index; a center tests the
//         points of its 3x3x3 cells only and keeps the ns lowest-index hits.
//         Cell coordinates are computed in double, so every point whose
//         float d2 passes the test lies in those 27 cells: the hits, hence the
//         result, are exactly the scan's. Cheap when balls are sparse.
//   The choice compares the 27 cells' point count with the expected scan
//   length; the result never depends on it.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "pointops/fps_tree.h"
#include "pointops/pointops_checks.h"

namespace {

constexpr int64_t kScanBlock = 64;

template <typename T>
struct Ball {
  T cx, cy, cz, min_r2, r2;
  bool hit(T x, T y, T z) const {
    const T d = dynkernels::fps::sq_dist(x, y, z, cx, cy, cz);
    return (d == T(0)) | ((d >= min_r2) & (d < r2));
  }
};

// The first ns hits in index order by scanning; returns how many were found.
template <typename T>
int64_t scan_hits(const T* px, const T* py, const T* pz, int64_t n, const Ball<T>& ball, int64_t ns, int64_t* row) {
  uint8_t hit[kScanBlock];
  int64_t count = 0;
  for (int64_t block = 0; block < n && count < ns; block += kScanBlock) {
    const int64_t len = std::min(kScanBlock, n - block);
    for (int64_t j = 0; j < len; ++j) hit[j] = ball.hit(px[block + j], py[block + j], pz[block + j]);
    for (int64_t j = 0; j < len && count < ns; ++j) {
      if (hit[j]) row[count++] = block + j;
    }
  }
  return count;
}

// One cloud's points bucketed into cubic cells, each cell's run in ascending
// point index, coordinates copied in run order for locality.
template <typename T>
class CellGrid {
 public:
  // False when a grid does not fit (more than ~4 cells per point) or the cloud
  // holds non-finite coordinates; the caller then scans.
  bool build(const T* px, const T* py, const T* pz, int64_t n, double radius) {
    if (n == 0) return false;
    double lo[3] = {INFINITY, INFINITY, INFINITY}, hi[3] = {-INFINITY, -INFINITY, -INFINITY};
    const T* axes[3] = {px, py, pz};
    for (int a = 0; a < 3; ++a) {
      for (int64_t i = 0; i < n; ++i) {
        const double v = static_cast<double>(axes[a][i]);
        if (!std::isfinite(v)) return false;
        lo[a] = std::min(lo[a], v);
        hi[a] = std::max(hi[a], v);
      }
    }
    inv_cell_ = 1.0 / (radius * 1.001);
    // Sized in double first: a tiny radius gives spans far beyond int64.
    const double max_cells = 4.0 * static_cast<double>(n) + 1024.0;
    double span[3], cells = 1.0;
    for (int a = 0; a < 3; ++a) {
      span[a] = std::floor((hi[a] - lo[a]) * inv_cell_) + 1.0;
      cells *= span[a];
    }
    if (!(cells <= max_cells)) return false;
    for (int a = 0; a < 3; ++a) {
      lo_[a] = lo[a];
      dims_[a] = static_cast<int64_t>(span[a]);
    }
    start_.assign(static_cast<size_t>(cells) + 1, 0);
    std::vector<int64_t> cell_of(n);
    for (int64_t i = 0; i < n; ++i) {
      cell_of[i] = linear(coord(px[i], 0), coord(py[i], 1), coord(pz[i], 2));
      ++start_[cell_of[i] + 1];
    }
    for (size_t c = 1; c < start_.size(); ++c) start_[c] += start_[c - 1];
    std::vector<int64_t> fill(start_.begin(), start_.end() - 1);
    order_.resize(n);
    x_.resize(n);
    y_.resize(n);
    z_.resize(n);
    for (int64_t i = 0; i < n; ++i) {  // ascending i: runs come out sorted
      const int64_t slot = fill[cell_of[i]]++;
      order_[slot] = i;
      x_[slot] = px[i];
      y_[slot] = py[i];
      z_[slot] = pz[i];
    }
    return true;
  }

  // The cells within one cell of the center, as [lo, hi] per axis; false if
  // none exists (the center is more than a cell outside the grid).
  bool neighbourhood(const Ball<T>& ball, int64_t lo[3], int64_t hi[3]) const {
    const T c[3] = {ball.cx, ball.cy, ball.cz};
    for (int a = 0; a < 3; ++a) {
      const double q = std::floor((static_cast<double>(c[a]) - lo_[a]) * inv_cell_);
      if (!(q >= -1.0 && q <= static_cast<double>(dims_[a]))) return false;
      lo[a] = std::max<int64_t>(0, static_cast<int64_t>(q) - 1);
      hi[a] = std::min<int64_t>(dims_[a] - 1, static_cast<int64_t>(q) + 1);
      if (lo[a] > hi[a]) return false;
    }
    return true;
  }

  int64_t candidates(const int64_t lo[3], const int64_t hi[3]) const {
    int64_t total = 0;
    for (int64_t i = lo[0]; i <= hi[0]; ++i)
      for (int64_t j = lo[1]; j <= hi[1]; ++j)
        total += start_[linear(i, j, hi[2]) + 1] - start_[linear(i, j, lo[2])];
    return total;
  }

  // All hits of the 27 cells, then the ns lowest indices in ascending order.
  int64_t hits(const Ball<T>& ball, const int64_t lo[3], const int64_t hi[3], int64_t ns, int64_t* row,
               std::vector<int64_t>& found) const {
    found.clear();
    for (int64_t i = lo[0]; i <= hi[0]; ++i) {
      for (int64_t j = lo[1]; j <= hi[1]; ++j) {
        // cells (i, j, lo[2]..hi[2]) are adjacent in memory: one run
        for (int64_t s = start_[linear(i, j, lo[2])]; s < start_[linear(i, j, hi[2]) + 1]; ++s) {
          if (ball.hit(x_[s], y_[s], z_[s])) found.push_back(order_[s]);
        }
      }
    }
    const int64_t count = std::min<int64_t>(ns, static_cast<int64_t>(found.size()));
    std::partial_sort(found.begin(), found.begin() + count, found.end());
    std::copy(found.begin(), found.begin() + count, row);
    return count;
  }

 private:
  int64_t coord(T v, int a) const {
    const int64_t q = static_cast<int64_t>(std::floor((static_cast<double>(v) - lo_[a]) * inv_cell_));
    return std::min<int64_t>(std::max<int64_t>(q, 0), dims_[a] - 1);
  }
  int64_t linear(int64_t i, int64_t j, int64_t k) const { return (i * dims_[1] + j) * dims_[2] + k; }

  double lo_[3] = {0, 0, 0}, inv_cell_ = 0;
  int64_t dims_[3] = {0, 0, 0};
  std::vector<int64_t> start_, order_;
  std::vector<T> x_, y_, z_;
};

template <typename T>
void ball_query_cloud_range(const T* px, const T* py, const T* pz, int64_t n, const CellGrid<T>* grid,
                            const T* centers, int64_t begin, int64_t end, T min_r2, T r2, int64_t ns,
                            int64_t* out) {
  std::vector<int64_t> found;
  for (int64_t m = begin; m < end; ++m) {
    const Ball<T> ball{centers[3 * m], centers[3 * m + 1], centers[3 * m + 2], min_r2, r2};
    int64_t* row = out + m * ns;
    int64_t count = 0;
    int64_t lo[3], hi[3];
    if (grid == nullptr) {
      count = scan_hits(px, py, pz, n, ball, ns, row);
    } else if (grid->neighbourhood(ball, lo, hi)) {
      // A ball fills about a fifth of its 27 cells: a scan finds ns hits after
      // ~ns * n / (candidates / 5) points; take the grid when that is more.
      const int64_t candidates = grid->candidates(lo, hi);
      const double scan_length = std::min<double>(n, 5.0 * ns * n / std::max<int64_t>(candidates, 1));
      count = 2.0 * candidates < scan_length ? grid->hits(ball, lo, hi, ns, row, found)
                                             : scan_hits(px, py, pz, n, ball, ns, row);
    }
    const int64_t pad = count == 0 ? -1 : row[0];
    for (int64_t k = count; k < ns; ++k) row[k] = pad;
  }
}

at::Tensor ball_query_cpu(const at::Tensor& xyz, const at::Tensor& centers, double min_radius, double radius,
                          int64_t num_samples) {
  DK_CHECK_CPU(xyz);
  DK_CHECK_CPU(centers);
  dynkernels::pointops::check_ball_query_args(xyz, centers, min_radius, radius, num_samples);
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
    // Grids pay off only when scanning would be long: skip them for small clouds.
    std::vector<CellGrid<scalar_t>> grids(n >= 4096 ? batch : 0);
    std::vector<uint8_t> has_grid(batch, 0);
    at::parallel_for(0, static_cast<int64_t>(grids.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* base = pts + b * 3 * n;
        has_grid[b] = grids[b].build(base, base + n, base + 2 * n, n, static_cast<double>(r));
      }
    });
    at::parallel_for(0, batch * m, 16, [&](int64_t begin, int64_t end) {
      while (begin < end) {
        const int64_t b = begin / m;
        const int64_t stop = std::min(end, (b + 1) * m);
        const scalar_t* base = pts + b * 3 * n;
        ball_query_cloud_range<scalar_t>(base, base + n, base + 2 * n, n, has_grid[b] ? &grids[b] : nullptr,
                                         c + b * m * 3, begin - b * m, stop - b * m, min_r2, r2, num_samples,
                                         out_ptr + b * m * num_samples);
        begin = stop;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) { m.impl("ball_query", &ball_query_cpu); }
