// isda_update_full_, CPU: ISDA's estimator update for a full covariance, in
// place, one present class at a time (see dynkernels/reference/isda.py).
//
// Per class c with batch rows X_c (n_b of them): mu_b = mean(X_c);
// S_b = (X_c - mu_b)^T (X_c - mu_b) / n_b (one BLAS product, centred first:
// stable in float32); w = n_b / (n_b + n[c]); delta = mu[c] - mu_b; then one
// pass over Sigma_c, tile pair by tile pair ((I, J) with (J, I)), writing
//   Sigma_c[i, j] = Sigma_c[j, i] = (1 - w) sym(Sigma_c)[i, j] + w sym(S_b)[i, j]
//                                 + w (1 - w) delta_i delta_j,
// so that Sigma stays exactly symmetric (the loss can then use Sigma d as its
// gradient direction); the official three-pass blend differs from this by
// rounding only. mu[c] and n[c] follow. Classes absent from the batch are not
// touched. The rows are sorted into one segment per class first (stable
// sort), so each class reads a contiguous block. Threads: the tile pairs of
// one class's merge.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "isda/isda_checks.h"

namespace {

constexpr int64_t kTile = 32;

// One tile pair (I, J), I <= J: the transposed halves go through small
// buffers (L1), so the row loops run over contiguous j and vectorise.
template <typename T>
void merge_tile_pair(T* cov, const T* s, const T* delta, T w, int64_t a, int64_t ti, int64_t tj) {
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  const int64_t ni = std::min(kTile, a - i0), nj = std::min(kTile, a - j0);
  T cov_t[kTile][kTile], s_t[kTile][kTile], out[kTile][kTile];  // [i][j] views of the (J, I) tiles
  for (int64_t j = 0; j < nj; ++j) {
    for (int64_t i = 0; i < ni; ++i) {
      cov_t[i][j] = cov[(j0 + j) * a + i0 + i];
      s_t[i][j] = s[(j0 + j) * a + i0 + i];
    }
  }
  const T keep = T(0.5) * (T(1) - w), take = T(0.5) * w, cross = w * (T(1) - w);
  for (int64_t i = 0; i < ni; ++i) {
    const T* c_row = cov + (i0 + i) * a + j0;
    const T* s_row = s + (i0 + i) * a + j0;
    const T di = cross * delta[i0 + i];
    for (int64_t j = 0; j < nj; ++j) {
      out[i][j] = keep * (c_row[j] + cov_t[i][j]) + take * (s_row[j] + s_t[i][j]) + di * delta[j0 + j];
    }
  }
  // On a diagonal tile out[i][j] and out[j][i] round differently (delta_i
  // delta_j associates the other way), so the upper half is mirrored.
  for (int64_t i = 0; i < ni; ++i) {
    for (int64_t j = (ti == tj ? i : 0); j < nj; ++j) cov[(i0 + i) * a + j0 + j] = out[i][j];
  }
  for (int64_t j = 0; j < nj; ++j) {
    for (int64_t i = 0; i < (ti == tj ? j + 1 : ni); ++i) cov[(j0 + j) * a + i0 + i] = out[i][j];
  }
}

template <typename T>
void merge_symmetric(T* cov, const T* s, const T* delta, T w, int64_t a) {
  const int64_t tiles = (a + kTile - 1) / kTile, pairs = tiles * (tiles + 1) / 2;
  at::parallel_for(0, pairs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      // p -> (ti, tj), ti <= tj, row-major over the upper triangle of tiles
      int64_t ti = 0, left = p;
      while (left >= tiles - ti) {
        left -= tiles - ti;
        ++ti;
      }
      merge_tile_pair(cov, s, delta, w, a, ti, ti + left);
    }
  });
}

void isda_update_full_cpu(at::Tensor& cov, at::Tensor& mean, at::Tensor& amount, const at::Tensor& features,
                          const at::Tensor& labels) {
  DK_CHECK_CPU(cov);
  const int64_t a = dynkernels::isda::check_update_args(cov, mean, amount, features, labels, /*full=*/true);
  dynkernels::isda::check_labels_cpu(labels, cov.size(0));
  if (features.size(0) == 0) return;
  // the rows sorted into one segment per class (stable: row order within a class)
  const auto lab = labels.contiguous();
  const at::Tensor order = std::get<1>(at::sort(lab, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor x = features.index_select(0, order);
  const int64_t classes = cov.size(0);
  std::vector<int64_t> offsets(classes + 1, 0);
  const int64_t* lp = lab.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < lab.numel(); ++i) ++offsets[lp[i] + 1];
  for (int64_t c = 0; c < classes; ++c) offsets[c + 1] += offsets[c];
  AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "isda_update_full_cpu", [&] {
    for (int64_t c = 0; c < classes; ++c) {
      const int64_t n_b = offsets[c + 1] - offsets[c];
      if (n_b == 0) continue;  // absent from the batch: untouched
      const at::Tensor rows = x.narrow(0, offsets[c], n_b);
      const at::Tensor mu_b = rows.mean(0);
      const at::Tensor centred = rows - mu_b;
      const at::Tensor s = at::mm(centred.t(), centred).div_(static_cast<double>(n_b)).contiguous();
      scalar_t* n = amount.data_ptr<scalar_t>() + c;
      const scalar_t w = static_cast<scalar_t>(n_b) / (static_cast<scalar_t>(n_b) + *n);
      scalar_t* mu = mean.data_ptr<scalar_t>() + c * a;
      const scalar_t* mub = mu_b.const_data_ptr<scalar_t>();
      std::vector<scalar_t> delta(a);
      for (int64_t i = 0; i < a; ++i) delta[i] = mu[i] - mub[i];
      merge_symmetric(cov.data_ptr<scalar_t>() + c * a * a, s.const_data_ptr<scalar_t>(), delta.data(), w, a);
      for (int64_t i = 0; i < a; ++i) mu[i] = (scalar_t(1) - w) * mu[i] + w * mub[i];
      *n += static_cast<scalar_t>(n_b);
    }
  });
}

// The diagonal update: per class, sums then centred squares in row order (two
// passes, deterministic), then the merge, all on (C, A) rows. Threads: blocks
// of columns (every class's sums for those columns).
template <typename T>
void update_diagonal(T* var, T* mean, T* amount, const T* x, const int64_t* labels, int64_t n, int64_t classes,
                     int64_t a) {
  std::vector<int64_t> count(classes, 0);
  for (int64_t i = 0; i < n; ++i) ++count[labels[i]];
  at::parallel_for(0, a, 64, [&](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::vector<T> sum(classes * width, T(0)), sq(classes * width, T(0));
    for (int64_t i = 0; i < n; ++i) {
      T* row = sum.data() + labels[i] * width;
      const T* xi = x + i * a + begin;
      for (int64_t j = 0; j < width; ++j) row[j] += xi[j];
    }
    for (int64_t c = 0; c < classes; ++c) {
      if (count[c] == 0) continue;
      for (int64_t j = 0; j < width; ++j) sum[c * width + j] /= static_cast<T>(count[c]);  // now the batch mean
    }
    for (int64_t i = 0; i < n; ++i) {
      const T* mu = sum.data() + labels[i] * width;
      T* row = sq.data() + labels[i] * width;
      const T* xi = x + i * a + begin;
      for (int64_t j = 0; j < width; ++j) {
        const T d = xi[j] - mu[j];
        row[j] += d * d;
      }
    }
    for (int64_t c = 0; c < classes; ++c) {
      if (count[c] == 0) continue;
      const T nb = static_cast<T>(count[c]), w = nb / (nb + amount[c]);
      for (int64_t j = 0; j < width; ++j) {
        T& v = var[c * a + begin + j];
        T& m = mean[c * a + begin + j];
        const T mu = sum[c * width + j], delta = m - mu;
        v = (T(1) - w) * v + w * (sq[c * width + j] / nb) + w * (T(1) - w) * delta * delta;
        m = (T(1) - w) * m + w * mu;
      }
    }
  });
  for (int64_t c = 0; c < classes; ++c) amount[c] += static_cast<T>(count[c]);
}

void isda_update_diagonal_cpu(at::Tensor& var, at::Tensor& mean, at::Tensor& amount, const at::Tensor& features,
                              const at::Tensor& labels) {
  DK_CHECK_CPU(var);
  const int64_t a = dynkernels::isda::check_update_args(var, mean, amount, features, labels, /*full=*/false);
  const int64_t classes = var.size(0);
  dynkernels::isda::check_labels_cpu(labels, classes);
  if (features.size(0) == 0) return;
  const at::Tensor x = features.contiguous(), lab = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "isda_update_diagonal_cpu", [&] {
    update_diagonal(var.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), amount.data_ptr<scalar_t>(),
                    x.const_data_ptr<scalar_t>(), lab.const_data_ptr<int64_t>(), x.size(0), classes, a);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("isda_update_full_", &isda_update_full_cpu);
  m.impl("isda_update_diagonal_", &isda_update_diagonal_cpu);
}
