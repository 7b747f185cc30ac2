// local_attention and its backward, CPU: softmax attention inside many small
// groups (Pointformer's Local Transformer), fused per group.
//
// Args:    q, k, v (G, H, S, D) float32/float64, any strides with unit stride
//          along D; row_index (G,) int64 in [-1, S), or empty for no weights.
// Forward: out = softmax((q * sqrt(1/D)) k^T) v per (g, h), no mask;
//          lse (G, H, S) = log-sum-exp of each score row (kept for the
//          backward); weights (G, S) = the head average of row row_index[g]
//          of the probabilities, or of their mean over rows where -1.
// Backward: recomputes p from q, k and lse; dp = dO v^T plus the weights'
//          gradient (dw / H on the picked row, dw / (H S) on every row for
//          the mean); ds = p (dp - rowsum(p dp)); dq = ds k / sqrt(D),
//          dk = ds^T q / sqrt(D), dv = p^T dO.
// Layout:  out, dq, dk, dv are returned as (G, H, S, D) views of (G, S, H, D)
//          memory, so merging heads afterwards ((G, S, H*D)) is free.
// Speed:   one group per task, its K^T and V staged in a small contiguous
//          buffer, the loops over keys written to vectorise; float exp is a
//          branch-free Cody-Waite + degree-6 polynomial (about 1 ulp) so that
//          it vectorises too. The group loops are compiled for AVX-512VL +
//          FMA, AVX2 + FMA and the baseline, picked at run time
//          (common/cpu_isa.h; GCC's target_clones("avx2") would leave FMA off).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"  // DK_ISA_DISPATCH; DK_INLINE: helpers inline into each ISA variant
#include "common/cpu_math.h"

namespace {

using dynkernels::exp_approx;


template <typename T>
struct Operand {
  const T* data;
  int64_t sg, sh, ss;  // strides of g, h, s (d is unit)
  const T* row(int64_t g, int64_t h, int64_t s) const { return data + g * sg + h * sh + s * ss; }
};

template <typename T>
Operand<T> operand(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

constexpr int64_t kChunk = 16;  // keys per register block in rows_times; staged rows are padded to it

inline int64_t padded(int64_t s) { return (s + kChunk - 1) / kChunk * kChunk; }

// 8 floats as one GCC vector: AVX in the avx2 clone, two SSE halves in the
// default one. Loads and stores go through memcpy (no alignment assumed).
typedef float v8sf __attribute__((vector_size(32)));

DK_INLINE v8sf load8(const float* p) {
  v8sf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
DK_INLINE void store8(float* p, v8sf v) { std::memcpy(p, &v, sizeof(v)); }

// Per-thread scratch for one head: K and V as rows and transposed, the S x S
// probabilities and their gradient, dK and dV accumulators.
template <typename T>
struct Scratch {
  std::vector<T> kt, kv, vt, v, p, dp, acc_k, acc_v;
  Scratch(int64_t s, int64_t d)
      : kt(padded(s) * d), kv(s * d), vt(padded(s) * d), v(s * d), p(s * padded(s)), dp(s * padded(s)),
        acc_k(s * d), acc_v(s * d) {}
};

// Copies one head's S rows into rows (S x D) and transposed (D x sp, the
// padding columns zero).
template <typename T>
DK_INLINE void stage(const Operand<T>& src, int64_t g, int64_t h, int64_t s, int64_t d, T* rows, T* transposed) {
  const int64_t sp = padded(s);
  for (int64_t j = 0; j < s; ++j) {
    const T* r = src.row(g, h, j);
    for (int64_t c = 0; c < d; ++c) {
      rows[j * d + c] = r[c];
      transposed[c * sp + j] = r[c];
    }
  }
  for (int64_t c = 0; c < d; ++c) std::fill(transposed + c * sp + s, transposed + (c + 1) * sp, T(0));
}

// Row reductions over kChunk explicit lanes: the lanes vectorise (a plain
// float reduction would not, without -ffast-math) and the order is fixed.
template <typename T>
DK_INLINE T row_max(const T* x, int64_t s) {
  T lane[kChunk];
  for (int64_t u = 0; u < kChunk; ++u) lane[u] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kChunk <= s; j += kChunk) {
    for (int64_t u = 0; u < kChunk; ++u) lane[u] = x[j + u] > lane[u] ? x[j + u] : lane[u];
  }
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t u = 0; u < kChunk; ++u) top = lane[u] > top ? lane[u] : top;
  for (; j < s; ++j) top = x[j] > top ? x[j] : top;
  return top;
}

// x[j] = exp(x[j] - shift) for j < s, x[j] = 0 on the padding up to padded(s); returns the sum.
template <typename T>
DK_INLINE T exp_row(T* x, int64_t s, T shift) {
  const int64_t sp = padded(s);
  for (int64_t j = 0; j < sp; ++j) x[j] = exp_approx(x[j] - shift);
  for (int64_t j = s; j < sp; ++j) x[j] = T(0);
  T lane[kChunk] = {};
  for (int64_t j = 0; j < sp; j += kChunk) {
    for (int64_t u = 0; u < kChunk; ++u) lane[u] += x[j + u];
  }
  T total = T(0);
  for (int64_t u = 0; u < kChunk; ++u) total += lane[u];
  return total;
}

template <typename T>
DK_INLINE T dot_row(const T* x, const T* y, int64_t sp) {
  T lane[kChunk] = {};
  for (int64_t j = 0; j < sp; j += kChunk) {
    for (int64_t u = 0; u < kChunk; ++u) lane[u] += x[j + u] * y[j + u];
  }
  T total = T(0);
  for (int64_t u = 0; u < kChunk; ++u) total += lane[u];
  return total;
}

// out[i, j] = sum_c (a_i[c] * scale) * bt[c, j] for the S rows a_i of one head
// (bt is D x sp, zero-padded to sp = padded(S) columns; out rows have sp
// entries). Blocks of 16 keys stay in registers across the D products.
template <typename T, int DC>
DK_INLINE void rows_times(const Operand<T>& a, int64_t g, int64_t h, const T* bt, int64_t s, int64_t d, T scale,
                       T* out) {
  const int64_t dd = DC > 0 ? DC : d, sp = padded(s);
  for (int64_t i = 0; i < s; ++i) {
    const T* ai = a.row(g, h, i);
    for (int64_t j0 = 0; j0 < sp; j0 += kChunk) {
      if constexpr (std::is_same_v<T, float> && kChunk == 16) {
        v8sf lo = {}, hi = {};
        for (int64_t c = 0; c < dd; ++c) {
          const float ac = ai[c] * scale;
          lo += ac * load8(bt + c * sp + j0);
          hi += ac * load8(bt + c * sp + j0 + 8);
        }
        store8(out + i * sp + j0, lo);
        store8(out + i * sp + j0 + 8, hi);
      } else {
        T acc[kChunk] = {};
        for (int64_t c = 0; c < dd; ++c) {
          const T ac = ai[c] * scale;
          const T* b = bt + c * sp + j0;
          for (int64_t jj = 0; jj < kChunk; ++jj) acc[jj] += ac * b[jj];
        }
        for (int64_t jj = 0; jj < kChunk; ++jj) out[i * sp + j0 + jj] = acc[jj];
      }
    }
  }
}

// acc[a, :] = sum_b w[a * ws_a + b * ws_b] * rows[b, :] for a, b < S, D wide:
// P V (ws = (sp, 1)), and with the transposed weights (ws = (1, sp)) dK and dV.
// Each output row is summed in registers when D is a compile-time size.
template <typename T, int DC>
DK_INLINE void weighted_rows(const T* w, int64_t ws_a, int64_t ws_b, const T* rows, int64_t s, int64_t d, T* acc) {
  const int64_t dd = DC > 0 ? DC : d;
  int64_t a = 0;
  if constexpr (DC > 0 && DC % 8 == 0 && std::is_same_v<T, float>) {
    // R output rows at once in vector registers: R independent add chains (an
    // add's latency, not its throughput, bounds one chain) sharing each row load.
    constexpr int NV = DC / 8;
    constexpr int R = NV == 1 ? 4 : (NV == 2 ? 3 : (NV == 4 ? 2 : 1));
    for (; a + R <= s; a += R) {
      v8sf sum[R][NV] = {};
      for (int64_t b = 0; b < s; ++b) {
        v8sf r[NV];
        for (int v = 0; v < NV; ++v) r[v] = load8(rows + b * DC + 8 * v);
        for (int u = 0; u < R; ++u) {
          const float wab = w[(a + u) * ws_a + b * ws_b];
          for (int v = 0; v < NV; ++v) sum[u][v] += wab * r[v];
        }
      }
      for (int u = 0; u < R; ++u) {
        for (int v = 0; v < NV; ++v) store8(acc + (a + u) * DC + 8 * v, sum[u][v]);
      }
    }
  }
  for (; a < s; ++a) {
    T* dst = acc + a * dd;
    std::fill(dst, dst + dd, T(0));
    for (int64_t b = 0; b < s; ++b) {
      const T wab = w[a * ws_a + b * ws_b];
      const T* r = rows + b * dd;
      for (int64_t c = 0; c < dd; ++c) dst[c] += wab * r[c];
    }
  }
}

template <typename T, int DC>
DK_INLINE void forward_group(int64_t g, const Operand<T>& q, const Operand<T>& k, const Operand<T>& v,
                                   int64_t heads, int64_t s, int64_t d, int64_t row, bool want_weights, T* out,
                                   T* lse, T* weights, int64_t row_stride, Scratch<T>& w) {
  const int64_t dd = DC > 0 ? DC : d, sp = padded(s);
  const T scale = std::sqrt(T(1) / static_cast<T>(dd));
  if (want_weights) std::fill(weights, weights + s, T(0));
  T* p = w.p.data();
  T* o = w.acc_v.data();
  for (int64_t h = 0; h < heads; ++h) {
    stage(k, g, h, s, dd, w.kv.data(), w.kt.data());
    stage(v, g, h, s, dd, w.v.data(), w.vt.data());
    rows_times<T, DC>(q, g, h, w.kt.data(), s, dd, scale, p);
    for (int64_t i = 0; i < s; ++i) {
      T* pi = p + i * sp;
      const T top = row_max(pi, s);
      const T total = exp_row(pi, s, top);
      const T inv = T(1) / total;
      for (int64_t j = 0; j < sp; ++j) pi[j] *= inv;
      lse[(g * heads + h) * s + i] = top + std::log(total);
      if (want_weights && (row < 0 || row == i)) {
        const T share = row < 0 ? T(1) / static_cast<T>(s) : T(1);
        for (int64_t j = 0; j < s; ++j) weights[j] += share * pi[j];
      }
    }
    weighted_rows<T, DC>(p, sp, 1, w.v.data(), s, dd, o);  // P V
    for (int64_t i = 0; i < s; ++i) {
      std::copy(o + i * dd, o + (i + 1) * dd, out + (g * s + i) * row_stride + h * dd);  // (G, S, [3,] H, D) memory
    }
  }
  if (want_weights) {
    for (int64_t j = 0; j < s; ++j) weights[j] /= static_cast<T>(heads);
  }
}

template <typename T, int DC>
DK_INLINE void backward_group(int64_t g, const Operand<T>& dout, const T* dweights, const Operand<T>& q,
                                    const Operand<T>& k, const Operand<T>& v, const T* lse, int64_t heads, int64_t s,
                                    int64_t d, int64_t row, T* dq, T* dk, T* dv, int64_t row_stride,
                                    Scratch<T>& w) {
  const int64_t dd = DC > 0 ? DC : d, sp = padded(s);
  const T scale = std::sqrt(T(1) / static_cast<T>(dd));
  T* p = w.p.data();
  T* ds = w.dp.data();
  for (int64_t h = 0; h < heads; ++h) {
    stage(k, g, h, s, dd, w.kv.data(), w.kt.data());
    stage(v, g, h, s, dd, w.v.data(), w.vt.data());
    rows_times<T, DC>(q, g, h, w.kt.data(), s, dd, scale, p);
    rows_times<T, DC>(dout, g, h, w.vt.data(), s, dd, T(1), ds);  // dp[i, j] = dO_i . v_j
    for (int64_t i = 0; i < s; ++i) {
      T* pi = p + i * sp;
      T* dpi = ds + i * sp;
      exp_row(pi, s, lse[(g * heads + h) * s + i]);
      if (dweights != nullptr && (row < 0 || row == i)) {
        const T share = (row < 0 ? T(1) / static_cast<T>(s) : T(1)) / static_cast<T>(heads);
        for (int64_t j = 0; j < s; ++j) dpi[j] += share * dweights[j];
      }
      const T delta = dot_row(pi, dpi, sp);
      for (int64_t j = 0; j < sp; ++j) dpi[j] = pi[j] * (dpi[j] - delta);
    }
    // q and dO rows, contiguous (the transposed buffers are free again).
    T* qrows = w.vt.data();
    T* dorows = w.kt.data();
    for (int64_t i = 0; i < s; ++i) {
      std::copy(q.row(g, h, i), q.row(g, h, i) + dd, qrows + i * dd);
      std::copy(dout.row(g, h, i), dout.row(g, h, i) + dd, dorows + i * dd);
    }
    T* acc = w.acc_k.data();
    weighted_rows<T, DC>(ds, sp, 1, w.kv.data(), s, dd, acc);  // dq = ds k
    for (int64_t i = 0; i < s; ++i) {
      T* dst = dq + (g * s + i) * row_stride + h * dd;
      for (int64_t c = 0; c < dd; ++c) dst[c] = acc[i * dd + c] * scale;
    }
    weighted_rows<T, DC>(ds, 1, sp, qrows, s, dd, acc);  // dk = ds^T q
    for (int64_t j = 0; j < s; ++j) {
      T* dst = dk + (g * s + j) * row_stride + h * dd;
      for (int64_t c = 0; c < dd; ++c) dst[c] = acc[j * dd + c] * scale;
    }
    weighted_rows<T, DC>(p, 1, sp, dorows, s, dd, acc);  // dv = p^T dO
    for (int64_t j = 0; j < s; ++j) std::copy(acc + j * dd, acc + (j + 1) * dd, dv + (g * s + j) * row_stride + h * dd);
  }
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_index) {
  DK_CHECK_CPU(q);
  DK_CHECK_DIM(q, 4);
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k and v must share a shape (G, H, S, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "local_attention on CPU takes float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() && row_index.device() == q.device(),
              "q, k, v and row_index must be on one device");
  TORCH_CHECK(row_index.scalar_type() == at::kLong && row_index.dim() == 1 &&
                  (row_index.numel() == 0 || row_index.size(0) == q.size(0)),
              "row_index must be int64 (G,) or empty");
  if (row_index.numel() > 0) {
    const int64_t* r = row_index.const_data_ptr<int64_t>();
    const int64_t rows = row_index.numel(), s = q.size(2);
    for (int64_t i = 0; i < rows; ++i) {
      TORCH_CHECK_INDEX(r[i] >= -1 && r[i] < s, "row_index must be in [-1, ", s, "), got ", r[i]);
    }
  }
}

// The ISA-dispatched group loops (no lambdas inside: a lambda would be
// compiled for the baseline, whatever its enclosing function's target).
template <typename T>
struct ForwardArgs {
  Operand<T> q, k, v;
  int64_t heads, s, d;
  const int64_t* rows;  // null: no weights wanted
  T *out, *lse, *weights;
  int64_t row_stride;
};

template <typename T, int DC>
DK_INLINE void forward_range(const ForwardArgs<T>& a, int64_t begin, int64_t end, Scratch<T>& scratch) {
  for (int64_t g = begin; g < end; ++g) {
    forward_group<T, DC>(g, a.q, a.k, a.v, a.heads, a.s, a.d, a.rows != nullptr ? a.rows[g] : 0, a.rows != nullptr,
                         a.out, a.lse, a.weights + g * a.s, a.row_stride, scratch);
  }
}

template <typename T, dynkernels::CpuIsa kIsa>
DK_INLINE void forward_groups(const ForwardArgs<T>* a, int64_t begin, int64_t end, Scratch<T>* scratch) {
  switch (a->d) {
    case 8: return forward_range<T, 8>(*a, begin, end, *scratch);
    case 16: return forward_range<T, 16>(*a, begin, end, *scratch);
    case 32: return forward_range<T, 32>(*a, begin, end, *scratch);
    case 64: return forward_range<T, 64>(*a, begin, end, *scratch);
    default: return forward_range<T, 0>(*a, begin, end, *scratch);
  }
}
DK_ISA_DISPATCH(forward_groups)

template <typename T>
struct BackwardArgs {
  Operand<T> dout, q, k, v;
  const T* dweights;  // null: no weights wanted
  const T* lse;
  const int64_t* rows;
  int64_t heads, s, d;
  T *dq, *dk, *dv;
  int64_t row_stride;
};

template <typename T, int DC>
DK_INLINE void backward_range(const BackwardArgs<T>& a, int64_t begin, int64_t end, Scratch<T>& scratch) {
  const bool want = a.dweights != nullptr;
  for (int64_t g = begin; g < end; ++g) {
    backward_group<T, DC>(g, a.dout, want ? a.dweights + g * a.s : nullptr, a.q, a.k, a.v, a.lse, a.heads, a.s,
                          a.d, want ? a.rows[g] : 0, a.dq, a.dk, a.dv, a.row_stride, scratch);
  }
}

template <typename T, dynkernels::CpuIsa kIsa>
DK_INLINE void backward_groups(const BackwardArgs<T>* a, int64_t begin, int64_t end, Scratch<T>* scratch) {
  switch (a->d) {
    case 8: return backward_range<T, 8>(*a, begin, end, *scratch);
    case 16: return backward_range<T, 16>(*a, begin, end, *scratch);
    case 32: return backward_range<T, 32>(*a, begin, end, *scratch);
    case 64: return backward_range<T, 64>(*a, begin, end, *scratch);
    default: return backward_range<T, 0>(*a, begin, end, *scratch);
  }
}
DK_ISA_DISPATCH(backward_groups)

at::Tensor unit_d(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// (G, S, H, D) memory viewed as (G, H, S, D).
at::Tensor heads_view(const at::Tensor& like) {
  return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

// The operands of one call: q, k, v (and dO) as (G, H, S, D) strided views.
struct Problem {
  at::Tensor q, k, v, rows;
  int64_t groups, heads, s, d;
  bool want() const { return rows.numel() > 0; }
};

// out: (G, S, [3,] H, D) memory with row_stride between (g, s) rows.
void run_forward(const Problem& pr, at::Tensor& out, int64_t row_stride, at::Tensor& lse, at::Tensor& weights) {
  AT_DISPATCH_FLOATING_TYPES(pr.q.scalar_type(), "local_attention_cpu", [&] {
    const auto qo = operand<scalar_t>(pr.q), ko = operand<scalar_t>(pr.k), vo = operand<scalar_t>(pr.v);
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* l = lse.data_ptr<scalar_t>();
    scalar_t* w = weights.data_ptr<scalar_t>();
    const int64_t* r = pr.want() ? pr.rows.const_data_ptr<int64_t>() : nullptr;
    const ForwardArgs<scalar_t> args{qo, ko, vo, pr.heads, pr.s, pr.d, r, o, l, w, row_stride};
    at::parallel_for(0, pr.groups, 8, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch(pr.s, pr.d);
      forward_groups_isa<scalar_t>(&args, begin, end, &scratch);
    });
  });
}

// dq, dk, dv: pointers into (G, S, [3,] H, D) memory with row_stride between (g, s) rows.
void run_backward(const Problem& pr, const at::Tensor& grad_out, const at::Tensor& grad_weights,
                  const at::Tensor& lse, void* dq, void* dk, void* dv, int64_t row_stride) {
  AT_DISPATCH_FLOATING_TYPES(pr.q.scalar_type(), "local_attention_backward_cpu", [&] {
    const auto qo = operand<scalar_t>(pr.q), ko = operand<scalar_t>(pr.k), vo = operand<scalar_t>(pr.v);
    const auto go = operand<scalar_t>(grad_out);
    const scalar_t* l = lse.const_data_ptr<scalar_t>();
    const bool want = pr.want();
    const scalar_t* dw = want ? grad_weights.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* r = want ? pr.rows.const_data_ptr<int64_t>() : nullptr;
    auto *pq = static_cast<scalar_t*>(dq), *pk = static_cast<scalar_t*>(dk), *pv = static_cast<scalar_t*>(dv);
    const BackwardArgs<scalar_t> args{go, qo, ko, vo, dw, l, r, pr.heads, pr.s, pr.d, pq, pk, pv, row_stride};
    at::parallel_for(0, pr.groups, 8, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch(pr.s, pr.d);
      backward_groups_isa<scalar_t>(&args, begin, end, &scratch);
    });
  });
}

at::Tensor checked_grad_weights(const Problem& pr, const at::Tensor& grad_weights) {
  if (!pr.want()) return grad_weights;
  at::Tensor gw = grad_weights.to(pr.q.scalar_type()).contiguous();
  TORCH_CHECK(gw.dim() == 2 && gw.size(0) == pr.groups && gw.size(1) == pr.s, "grad_weights must be (G, S)");
  return gw;
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_index) {
  check_qkv(q, k, v, row_index);
  return {unit_d(q), unit_d(k), unit_d(v), row_index.contiguous(), q.size(0), q.size(1), q.size(2), q.size(3)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                   const at::Tensor& v,
                                                                   const at::Tensor& row_index) {
  const Problem pr = make_problem(q, k, v, row_index);
  at::Tensor out = heads_view(pr.q);
  at::Tensor lse = at::empty({pr.groups, pr.heads, pr.s}, pr.q.options());
  at::Tensor weights = at::zeros({pr.groups, pr.s}, pr.q.options());
  if (pr.q.numel() > 0) run_forward(pr, out, pr.heads * pr.d, lse, weights);
  return {out, weights, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_weights, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& lse, const at::Tensor& row_index) {
  const Problem pr = make_problem(q, k, v, row_index);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(), "grad_out must match q");
  at::Tensor dq = heads_view(pr.q), dk = heads_view(pr.q), dv = heads_view(pr.q);
  if (pr.q.numel() == 0) return {dq, dk, dv};
  run_backward(pr, unit_d(grad_out), checked_grad_weights(pr, grad_weights), lse.contiguous().to(pr.q.scalar_type()),
               dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), pr.heads * pr.d);
  return {dq, dk, dv};
}

// Packed variant for attention layers: qkv (G, S, 3 * H * D) as a fused input
// projection produces it -> out (G, S, H * D), weights, lse; its backward
// writes dqkv (G, S, 3 * H * D) in one buffer, so no head split or merge is
// ever copied.
Problem packed_problem(const at::Tensor& qkv, int64_t heads, const at::Tensor& row_index) {
  DK_CHECK_DIM(qkv, 3);
  TORCH_CHECK(heads >= 1 && qkv.size(2) % (3 * heads) == 0, "qkv's last dim must be 3 * heads * head_dim, got ",
              qkv.size(2), " for heads=", heads);
  at::Tensor packed = qkv.contiguous();
  const int64_t g = packed.size(0), s = packed.size(1), d = packed.size(2) / (3 * heads);
  auto views = packed.view({g, s, 3, heads, d}).permute({2, 0, 3, 1, 4}).unbind(0);
  return make_problem(views[0], views[1], views[2], row_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_packed_cpu(const at::Tensor& qkv, int64_t heads,
                                                                          const at::Tensor& row_index) {
  const Problem pr = packed_problem(qkv, heads, row_index);
  at::Tensor out = at::empty({pr.groups, pr.s, pr.heads * pr.d}, pr.q.options());
  at::Tensor lse = at::empty({pr.groups, pr.heads, pr.s}, pr.q.options());
  at::Tensor weights = at::zeros({pr.groups, pr.s}, pr.q.options());
  if (pr.q.numel() > 0) run_forward(pr, out, pr.heads * pr.d, lse, weights);
  return {out, weights, lse};
}

at::Tensor local_attention_packed_backward_cpu(const at::Tensor& grad_out, const at::Tensor& grad_weights,
                                               const at::Tensor& qkv, int64_t heads, const at::Tensor& lse,
                                               const at::Tensor& row_index) {
  const Problem pr = packed_problem(qkv, heads, row_index);
  const int64_t c = pr.heads * pr.d;
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == pr.groups && grad_out.size(1) == pr.s &&
                  grad_out.size(2) == c && grad_out.scalar_type() == qkv.scalar_type(),
              "grad_out must be (G, S, H * D) in qkv's dtype");
  at::Tensor dqkv = at::empty({pr.groups, pr.s, 3 * c}, pr.q.options());
  if (pr.q.numel() == 0) return dqkv;
  at::Tensor go = grad_out.contiguous().view({pr.groups, pr.s, pr.heads, pr.d}).transpose(1, 2);
  auto* base = static_cast<char*>(dqkv.data_ptr());
  const int64_t step = c * static_cast<int64_t>(dqkv.element_size());
  run_backward(pr, go, checked_grad_weights(pr, grad_weights), lse.contiguous().to(pr.q.scalar_type()), base,
               base + step, base + 2 * step, 3 * c);
  return dqkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("local_attention", &local_attention_cpu);
  m.impl("local_attention_backward", &local_attention_backward_cpu);
  m.impl("local_attention_packed", &local_attention_packed_cpu);
  m.impl("local_attention_packed_backward", &local_attention_packed_backward_cpu);
}
