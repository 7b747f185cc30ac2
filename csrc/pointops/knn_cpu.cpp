// knn, CPU.
//
// Args:    xyz (B, N, 3), centers (B, M, 3), both float32 or both float64; 1 <= k <= N.
// Returns  (dist2 (B, M, k) in the input dtype, idx (B, M, k) int64): the k
//          smallest d2 = ((dx*dx + dy*dy) + dz*dz) per center in ascending
//          (d2, index) order; NaN ranks after +inf (its key is above inf's).
// Method:  each cloud is cut into leaves of 32 consecutive points along a
//          Morton curve (the FPS tree's order). A query computes every leaf's
//          box lower bound, scans the closest leaf first, then every leaf whose
//          bound is not above the current k-th distance. The float bound never
//          exceeds an inside point's float d2 (see fps_tree.h), and leaves are
//          skipped only when strictly above, so the result equals the brute
//          force's, ties included. Clouds with non-finite coordinates, and
//          small ones, are scanned by brute force.
// Threads: leaves per cloud in parallel, then queries over B*M.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "pointops/fps_tree.h"
#include "pointops/pointops_checks.h"

namespace {

using dynkernels::fps::box_lower_bound;
using dynkernels::fps::sq_dist;

// A total order on non-negative distances: the IEEE bits, NaN above +inf.
inline uint32_t order_key(float d) {
  uint32_t u;
  std::memcpy(&u, &d, sizeof(u));
  return d != d ? 0x7fc00000u : u;
}
inline uint64_t order_key(double d) {
  uint64_t u;
  std::memcpy(&u, &d, sizeof(u));
  return d != d ? 0x7ff8000000000000ull : u;
}

// The k best (d2, index) pairs seen so far, ascending.
template <typename T>
class Neighbours {
 public:
  using key_t = decltype(order_key(T(0)));
  Neighbours(int64_t k, T* dist, int64_t* idx) : k_(k), dist_(dist), idx_(idx), key_(static_cast<size_t>(k)) {}

  bool full() const { return count_ == k_; }
  T worst() const { return dist_[k_ - 1]; }

  void offer(T d, int64_t id) {
    const key_t key = order_key(d);
    if (full() && !(key < key_[k_ - 1] || (key == key_[k_ - 1] && id < idx_[k_ - 1]))) return;
    int64_t pos = full() ? k_ - 1 : count_++;
    while (pos > 0 && (key_[pos - 1] > key || (key_[pos - 1] == key && idx_[pos - 1] > id))) {
      key_[pos] = key_[pos - 1];
      dist_[pos] = dist_[pos - 1];
      idx_[pos] = idx_[pos - 1];
      --pos;
    }
    key_[pos] = key;
    dist_[pos] = d;
    idx_[pos] = id;
  }

 private:
  int64_t k_, count_ = 0;
  T* dist_;
  int64_t* idx_;
  std::vector<key_t> key_;
};

template <typename T>
class KnnLeaves {
 public:
  static constexpr int64_t kLeaf = 32;

  void build(const T* xyz, int64_t n) {
    std::vector<int64_t> ids(n);
    for (int64_t i = 0; i < n; ++i) ids[i] = i;
    const auto points = dynkernels::fps::BucketTree<T>::morton_order(xyz, ids);
    x_.resize(n);
    y_.resize(n);
    z_.resize(n);
    id_.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      x_[i] = points[i].p[0];
      y_[i] = points[i].p[1];
      z_[i] = points[i].p[2];
      id_[i] = points[i].id;
    }
    const int64_t leaves = (n + kLeaf - 1) / kLeaf;
    box_.resize(static_cast<size_t>(6 * leaves));
    for (int64_t l = 0; l < leaves; ++l) {
      T* b = &box_[6 * l];
      b[0] = b[1] = b[2] = std::numeric_limits<T>::infinity();
      b[3] = b[4] = b[5] = -std::numeric_limits<T>::infinity();
      for (int64_t i = l * kLeaf; i < std::min(n, (l + 1) * kLeaf); ++i) {
        const T p[3] = {x_[i], y_[i], z_[i]};
        for (int a = 0; a < 3; ++a) {
          b[a] = std::min(b[a], p[a]);
          b[3 + a] = std::max(b[3 + a], p[a]);
        }
      }
    }
  }

  void query(const T q[3], Neighbours<T>& best, std::vector<T>& bound) const {
    const int64_t n = static_cast<int64_t>(id_.size());
    const int64_t leaves = (n + kLeaf - 1) / kLeaf;
    bound.resize(leaves);
    int64_t closest = 0;
    for (int64_t l = 0; l < leaves; ++l) {
      bound[l] = box_lower_bound(&box_[6 * l], &box_[6 * l + 3], q);
      if (bound[l] < bound[closest]) closest = l;
    }
    // The closest leaf and its curve neighbours first: a tight k-th distance early.
    const int64_t first = std::max<int64_t>(0, closest - 1), last = std::min(leaves - 1, closest + 1);
    for (int64_t l = first; l <= last; ++l) scan_leaf(l, q, best);
    for (int64_t l = 0; l < leaves; ++l) {
      if (l >= first && l <= last) continue;
      if (best.full() && bound[l] > best.worst()) continue;
      scan_leaf(l, q, best);
    }
  }

 private:
  void scan_leaf(int64_t l, const T q[3], Neighbours<T>& best) const {
    const int64_t stop = std::min<int64_t>(static_cast<int64_t>(id_.size()), (l + 1) * kLeaf);
    for (int64_t i = l * kLeaf; i < stop; ++i) best.offer(sq_dist(x_[i], y_[i], z_[i], q[0], q[1], q[2]), id_[i]);
  }

  std::vector<T> x_, y_, z_, box_;
  std::vector<int64_t> id_;
};

template <typename T>
bool all_finite(const T* xyz, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(xyz[i])) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& xyz, const at::Tensor& centers, int64_t k) {
  DK_CHECK_CPU(xyz);
  DK_CHECK_CPU(centers);
  dynkernels::pointops::check_knn_args(xyz, centers, k);
  const int64_t batch = xyz.size(0), n = xyz.size(1), m = centers.size(1);
  at::Tensor dist = at::empty({batch, m, k}, xyz.options());
  at::Tensor idx = at::empty({batch, m, k}, xyz.options().dtype(at::kLong));
  if (dist.numel() == 0) return {dist, idx};
  at::Tensor pts = xyz.contiguous(), ctr = centers.contiguous();
  AT_DISPATCH_FLOATING_TYPES(xyz.scalar_type(), "knn_cpu", [&] {
    const scalar_t* p = pts.const_data_ptr<scalar_t>();
    const scalar_t* c = ctr.const_data_ptr<scalar_t>();
    std::vector<KnnLeaves<scalar_t>> leaves(batch);
    std::vector<uint8_t> use_leaves(batch, 0);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        use_leaves[b] = n >= 8 * KnnLeaves<scalar_t>::kLeaf && all_finite(p + b * n * 3, n * 3);
        if (use_leaves[b]) leaves[b].build(p + b * n * 3, n);
      }
    });
    scalar_t* dist_ptr = dist.data_ptr<scalar_t>();
    int64_t* idx_ptr = idx.data_ptr<int64_t>();
    at::parallel_for(0, batch * m, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> bound;
      for (int64_t q = begin; q < end; ++q) {
        const int64_t b = q / m;
        const scalar_t* center = c + q * 3;
        Neighbours<scalar_t> best(k, dist_ptr + q * k, idx_ptr + q * k);
        if (use_leaves[b]) {
          leaves[b].query(center, best, bound);
        } else {
          const scalar_t* cloud = p + b * n * 3;
          for (int64_t i = 0; i < n; ++i) {
            best.offer(sq_dist(cloud[3 * i], cloud[3 * i + 1], cloud[3 * i + 2], center[0], center[1], center[2]), i);
          }
        }
      }
    });
  });
  return {dist, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) { m.impl("knn", &knn_cpu); }
