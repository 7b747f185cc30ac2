// Exact farthest point sampling on the CPU (float or double), pruned with a KD-tree of buckets.
//
// Header-only and free of torch so that it can be unit-timed on its own; the
// torch glue lives in furthest_point_sample_cpu.cpp.
//
// Semantics (identical to dynkernels.reference.furthest_point_sample):
//   md[i] = +inf for every point; s = start_index
//   repeat M times: emit s; d[i] = ((x_i-x_s)^2 + (y_i-y_s)^2) + (z_i-z_s)^2 in
//   the input precision (this exact order, no FMA); md[i] = fmin(md[i], d[i]); md[s] = -1;
//   s = the lowest index i with the largest md[i].
// Selected points get md = -1, so no index repeats while M <= N, duplicates
// included (mmcv repeats indices once distinct points run out).
//
// Why pruning is exact: a bucket (KD node) is skipped when the squared distance
// from the new sample to its bounding box, lb, is >= the largest md inside it;
// then no point of the bucket can get a smaller md. fp32 subtraction, squaring
// and addition are monotone under round-to-nearest, so the float lb computed in
// the same operation order is never larger than the float d of any point inside
// the box. This needs finite coordinates; non-finite clouds take the dense path.
// The file must be compiled without floating-point contraction
// (-ffp-contract=off), or a fused multiply-add would break bit-equality with the
// reference.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DYNKERNELS_CPU_RELAX() _mm_pause()
#else
#define DYNKERNELS_CPU_RELAX() ((void)0)
#endif

namespace dynkernels {
namespace fps {

template <typename T>
inline T sq_dist(T x, T y, T z, T px, T py, T pz) {
  const T dx = x - px;
  const T dy = y - py;
  const T dz = z - pz;
  return (dx * dx + dy * dy) + dz * dz;
}

// The FPS order: larger min-distance first, then the lower original index.
template <typename T>
struct Candidate {
  T md;
  int64_t index;
  bool beats(const Candidate<T>& other) const {
    return md > other.md || (md == other.md && index < other.index);
  }
};

// Squared distance from p to an axis-aligned box, computed so that it is a
// float lower bound of sq_dist(p, q) for every q inside the box.
template <typename T>
inline T box_lower_bound(const T lo[3], const T hi[3], const T p[3]) {
  T t[3];
  for (int a = 0; a < 3; ++a) {
    t[a] = p[a] < lo[a] ? lo[a] - p[a] : (p[a] > hi[a] ? p[a] - hi[a] : T(0));
  }
  return (t[0] * t[0] + t[1] * t[1]) + t[2] * t[2];
}

// A KD-tree over a subset of one cloud's points, in bucket (leaf) order.
// Inside a leaf, points are kept in ascending original index, so the first
// maximum met in leaf order is the FPS choice for that leaf.
template <typename T>
class BucketTree {
 public:
  static constexpr int kLeafSize = 64;
  static constexpr T kInf = std::numeric_limits<T>::infinity();

  // xyz: (N, 3) row-major; ids: the original indices of this tree's points.
  BucketTree(const T* xyz, int64_t num_cloud_points, const std::vector<int64_t>& ids) : xyz_(xyz) {
    const int64_t n = static_cast<int64_t>(ids.size());
    std::vector<Point> points = morton_order(xyz, ids);
    nodes_.reserve(static_cast<size_t>(4 * (n / kLeafSize + 1)));
    if (n > 0) build(points.data(), 0, n);
    x_.resize(n);
    y_.resize(n);
    z_.resize(n);
    order_.resize(n);
    md_.assign(n, kInf);
    position_.assign(num_cloud_points, -1);
    for (int64_t i = 0; i < n; ++i) {
      x_[i] = points[i].p[0];
      y_[i] = points[i].p[1];
      z_[i] = points[i].p[2];
      order_[i] = points[i].id;
      position_[points[i].id] = i;
    }
  }

  // Folds the new sample `s` (original index) into every md; returns this
  // tree's best candidate (md = -inf when the tree is empty).
  Candidate<T> add_sample(int64_t s) {
    if (nodes_.empty()) return {-kInf, INT64_MAX};
    const T p[3] = {xyz_[3 * s], xyz_[3 * s + 1], xyz_[3 * s + 2]};
    update(0, p, position_[s]);
    return nodes_[0].best;
  }

  // Point and morton_order are also used by the kNN leaves (knn_cpu.cpp).
  struct Point {
    T p[3];
    uint32_t code;
    int64_t id;
  };
 private:
  struct Node {
    T lo[3], hi[3];
    Candidate<T> best;
    int64_t begin, end;
    int32_t left, right;  // -1 for a leaf
  };

 public:
  // Spreads the low 10 bits of v so that two zero bits follow each one.
  static uint32_t spread_bits(uint32_t v) {
    v &= 0x3ffu;
    v = (v | (v << 16)) & 0x30000ffu;
    v = (v | (v << 8)) & 0x300f00fu;
    v = (v | (v << 4)) & 0x30c30c3u;
    v = (v | (v << 2)) & 0x9249249u;
    return v;
  }

  // The points sorted along a 30-bit Morton curve (LSD radix sort: no
  // data-dependent branches), so that every octree cell is one run.
  static std::vector<Point> morton_order(const T* xyz, const std::vector<int64_t>& ids) {
    const int64_t n = static_cast<int64_t>(ids.size());
    T lo[3] = {kInf, kInf, kInf}, hi[3] = {-kInf, -kInf, -kInf};
    for (int64_t id : ids) {
      for (int a = 0; a < 3; ++a) {
        lo[a] = std::min(lo[a], xyz[3 * id + a]);
        hi[a] = std::max(hi[a], xyz[3 * id + a]);
      }
    }
    T scale[3];
    for (int a = 0; a < 3; ++a) scale[a] = hi[a] > lo[a] ? T(1023) / (hi[a] - lo[a]) : T(0);
    std::vector<Point> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids[i];
      uint32_t code = 0;
      for (int k = 0; k < 3; ++k) {
        const T q = (xyz[3 * id + k] - lo[k]) * scale[k];
        code |= spread_bits(static_cast<uint32_t>(std::min(std::max(q, T(0)), T(1023)))) << k;
      }
      a[i] = {{xyz[3 * id], xyz[3 * id + 1], xyz[3 * id + 2]}, code, id};
    }
    constexpr int kBits = 10;
    std::vector<int64_t> count(1 << kBits);
    for (int shift = 0; shift < 30; shift += kBits) {
      std::fill(count.begin(), count.end(), 0);
      for (const Point& q : a) ++count[(q.code >> shift) & ((1u << kBits) - 1)];
      int64_t sum = 0;
      for (int64_t& c : count) {
        const int64_t t = c;
        c = sum;
        sum += t;
      }
      for (const Point& q : a) b[count[(q.code >> shift) & ((1u << kBits) - 1)]++] = q;
      a.swap(b);
    }
    return a;
  }

 private:
  // Node over the Morton-sorted points [begin, end): split where the highest
  // bit that differs inside the run flips, so that nodes are octree cells and
  // their boxes stay tight (in the middle when all codes are equal). Leaves
  // are re-sorted by index, so the first maximum in a leaf is its FPS choice.
  int32_t build(Point* pts, int64_t begin, int64_t end) {
    const int32_t id = static_cast<int32_t>(nodes_.size());
    nodes_.push_back(Node{});
    Node node{};
    node.begin = begin;
    node.end = end;
    node.left = node.right = -1;
    if (end - begin <= kLeafSize) {
      std::sort(pts + begin, pts + end, [](const Point& u, const Point& v) { return u.id < v.id; });
      for (int a = 0; a < 3; ++a) {
        node.lo[a] = kInf;
        node.hi[a] = -kInf;
      }
      for (int64_t i = begin; i < end; ++i) {
        for (int a = 0; a < 3; ++a) {
          node.lo[a] = std::min(node.lo[a], pts[i].p[a]);
          node.hi[a] = std::max(node.hi[a], pts[i].p[a]);
        }
      }
      node.best = {kInf, pts[begin].id};
      nodes_[id] = node;
      return id;
    }
    const uint32_t differ = pts[begin].code ^ pts[end - 1].code;
    int64_t mid = begin + (end - begin) / 2;
    if (differ != 0) {
      const uint32_t bit = 1u << (31 - __builtin_clz(differ));
      mid = std::partition_point(pts + begin, pts + end, [bit](const Point& q) { return (q.code & bit) == 0; }) - pts;
    }
    node.left = build(pts, begin, mid);
    node.right = build(pts, mid, end);
    const Node& l = nodes_[node.left];
    const Node& r = nodes_[node.right];
    for (int a = 0; a < 3; ++a) {
      node.lo[a] = std::min(l.lo[a], r.lo[a]);
      node.hi[a] = std::max(l.hi[a], r.hi[a]);
    }
    node.best = r.best.beats(l.best) ? r.best : l.best;
    nodes_[id] = node;
    return id;
  }

  void update(int32_t id, const T p[3], int64_t s_pos) {
    Node& node = nodes_[id];
    const bool holds_sample = s_pos >= node.begin && s_pos < node.end;
    if (!holds_sample && !(box_lower_bound(node.lo, node.hi, p) < node.best.md)) return;
    if (node.left < 0) {
      update_leaf(node, p, s_pos);
      return;
    }
    update(node.left, p, s_pos);
    update(node.right, p, s_pos);
    const Candidate<T>& l = nodes_[node.left].best;
    const Candidate<T>& r = nodes_[node.right].best;
    node.best = r.beats(l) ? r : l;
  }

  void update_leaf(Node& node, const T p[3], int64_t s_pos) {
    T* md = md_.data();
    const T* x = x_.data();
    const T* y = y_.data();
    const T* z = z_.data();
    const T px = p[0], py = p[1], pz = p[2];
    T top = -kInf;
    for (int64_t i = node.begin; i < node.end; ++i) {
      const T d = sq_dist(x[i], y[i], z[i], px, py, pz);
      const T m = d < md[i] ? d : md[i];
      md[i] = m;
      top = m > top ? m : top;
    }
    if (s_pos >= node.begin && s_pos < node.end) {
      md[s_pos] = T(-1);
      top = -kInf;
      for (int64_t i = node.begin; i < node.end; ++i) top = md[i] > top ? md[i] : top;
    }
    int64_t i = node.begin;
    while (md[i] != top) ++i;  // leaf order is index order: the first maximum wins
    node.best = {top, order_[i]};
  }

  const T* xyz_;
  std::vector<T> x_, y_, z_, md_;
  std::vector<int64_t> order_;     // leaf order -> original index
  std::vector<int64_t> position_;  // original index -> leaf order, -1 if not here
  std::vector<Node> nodes_;
};

// Sense-reversing spin barrier for a fixed team of threads that are known to
// run concurrently (std::threads we start ourselves, never pool tasks).
class SpinBarrier {
 public:
  explicit SpinBarrier(int count) : count_(count) {}
  void wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == count_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == generation) {
      if (++spins < 4096) {
        DYNKERNELS_CPU_RELAX();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// Dense O(N*M) FPS: the path for non-finite clouds and tiny clouds.
template <typename T>
inline void sample_dense(const T* xyz, int64_t n, int64_t m, int64_t start, int64_t* out) {
  std::vector<T> x(n), y(n), z(n), md(n, std::numeric_limits<T>::infinity());
  for (int64_t i = 0; i < n; ++i) {
    x[i] = xyz[3 * i];
    y[i] = xyz[3 * i + 1];
    z[i] = xyz[3 * i + 2];
  }
  int64_t s = start;
  for (int64_t it = 0; it < m; ++it) {
    out[it] = s;
    if (it + 1 == m) break;
    const T px = x[s], py = y[s], pz = z[s];
    for (int64_t i = 0; i < n; ++i) {
      const T d = sq_dist(x[i], y[i], z[i], px, py, pz);
      md[i] = d < md[i] ? d : md[i];  // a NaN d leaves md alone, as fmin does
    }
    md[s] = T(-1);
    Candidate<T> best{-std::numeric_limits<T>::infinity(), INT64_MAX};
    for (int64_t i = 0; i < n; ++i) {
      if (md[i] > best.md) best = {md[i], i};  // strict: the first maximum wins
    }
    s = best.index;
  }
}

template <typename T>
inline bool all_finite(const T* xyz, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < 3 * n; ++i) finite &= std::isfinite(xyz[i]);
  return finite;
}

// Pruned exact FPS of one cloud with `threads` workers (threads >= 1). Each
// worker owns a tree over an interleaved 1/threads of the points, so every
// tree covers the whole cloud and the per-sample work splits evenly.
template <typename T>
inline void sample_pruned(const T* xyz, int64_t n, int64_t m, int64_t start, int64_t* out, int threads) {
  // Below ~8k points a barrier per sample costs more than the split saves.
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / 8192)));
  auto make_tree = [&](int t) {
    std::vector<int64_t> ids;
    ids.reserve(static_cast<size_t>(n / threads + 1));
    for (int64_t i = t; i < n; i += threads) ids.push_back(i);
    return BucketTree<T>(xyz, n, ids);
  };
  if (threads == 1) {
    BucketTree<T> tree = make_tree(0);
    int64_t s = start;
    for (int64_t it = 0; it < m; ++it) {
      out[it] = s;
      if (it + 1 == m) break;
      s = tree.add_sample(s).index;
    }
    return;
  }
  struct alignas(64) Slot {
    Candidate<T> best;
  };
  std::vector<Slot> slots(static_cast<size_t>(2 * threads));
  SpinBarrier barrier(threads);
  auto worker = [&](int t) {
    BucketTree<T> tree = make_tree(t);
    int64_t s = start;
    for (int64_t it = 0; it < m; ++it) {
      if (t == 0) out[it] = s;
      if (it + 1 == m) break;
      Slot* round = slots.data() + (it & 1) * threads;
      round[t].best = tree.add_sample(s);
      barrier.wait();
      Candidate<T> best = round[0].best;
      for (int u = 1; u < threads; ++u) {
        if (round[u].best.beats(best)) best = round[u].best;
      }
      s = best.index;
    }
  };
  std::vector<std::thread> team;
  team.reserve(static_cast<size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) team.emplace_back(worker, t);
  worker(0);
  for (auto& th : team) th.join();
}

// One cloud: the dense path for tiny or non-finite clouds, the pruned one else.
template <typename T>
inline void sample_cloud(const T* xyz, int64_t n, int64_t m, int64_t start, int64_t* out, int threads) {
  if (m <= 0) return;
  if (n <= 4 * BucketTree<T>::kLeafSize || !all_finite(xyz, n)) {
    sample_dense(xyz, n, m, start, out);
  } else {
    sample_pruned(xyz, n, m, start, out, threads);
  }
}

}  // namespace fps
}  // namespace dynkernels
