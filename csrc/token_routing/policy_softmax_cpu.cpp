// softmax_with_policy, CPU: DynamicViT's training-time attention softmax
// (see dynkernels/ops/token_routing_pruning.py) in one pass per row, and its
// backward, without the official code's (B, 1, N, N) policy matrix, its float
// copy of the logits and its exp'd copy.
//
// Row (b, h, i) of logits a, policy p (B, N), c = eps / N:
//   m = max_j a_j, u_j = exp(a_j - m) q_j with q_j = p_j (j != i), 1 (j = i),
//   U = sum_j u_j, out_j = (u_j + c) / (U + eps).
// Backward, g = dL/dout, w_j = u_j / (U + eps), D = sum_j g_j out_j, G = sum_j g_j:
//   dL/da_j = w_j (g_j - D), plus at the first maximum (the max's own
//   gradient, as torch.max routes it) c G / (U + eps) - D eps / (U + eps);
//   dL/dp_j += exp(a_j - m) (g_j - D) / (U + eps) for every row i != j (the
//   diagonal's q_i = p_i + (1 - p_i) does not depend on p_i).
// Computed in float for float / half inputs, in double for double (the
// official code computes in float32 even then; documented). Rows in parallel
// over (b, h); the policy gradient is summed per (b, h) into its own buffer,
// then over h in order: deterministic for any thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common/checks.h"
#include "common/cpu_math.h"

namespace {

void check_inputs(const at::Tensor& attn, const at::Tensor& policy) {
  DK_CHECK_CPU(attn);
  DK_CHECK_CPU(policy);
  DK_CHECK_DIM(attn, 4);
  const int64_t b = attn.size(0), n = attn.size(2);
  TORCH_CHECK(attn.size(3) == n, "attn must be (B, H, N, N), got ", attn.sizes());
  TORCH_CHECK(policy.dim() == 3 && policy.size(0) == b && policy.size(1) == n && policy.size(2) == 1,
              "policy must be (B, N, 1) = (", b, ", ", n, ", 1), got ", policy.sizes());
  TORCH_CHECK(at::isFloatingType(attn.scalar_type()) && at::isFloatingType(policy.scalar_type()),
              "attn and policy must be floating, got ", attn.scalar_type(), " and ", policy.scalar_type());
}

// the row's max (first position on ties), exp(a_j - m) in `e`, u_j in `u` (may alias e), and U
template <typename T, typename A>
A row_weights(const T* a, const A* p, int64_t n, int64_t i, A* e, A* u, int64_t* argmax) {
  A m = A(a[0]);
  int64_t at = 0;
  for (int64_t j = 1; j < n; ++j) {
    if (A(a[j]) > m) {
      m = A(a[j]);
      at = j;
    }
  }
  for (int64_t j = 0; j < n; ++j) e[j] = dynkernels::exp_approx(A(a[j]) - m);
  A total = 0;
  for (int64_t j = 0; j < n; ++j) {
    u[j] = e[j] * (j == i ? A(1) : p[j]);
    total += u[j];
  }
  if (argmax != nullptr) *argmax = at;
  return total;
}

template <typename T>
void forward_kernel(const T* attn, const at::opmath_type<T>* policy, T* out, int64_t b, int64_t h, int64_t n,
                    double eps) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, b * h * n, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> u(n);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % n, sample = row / (h * n);
      const A total = row_weights(attn + row * n, policy + sample * n, n, i, u.data(), u.data(), nullptr);
      const A c = A(eps) / A(n), inv = A(1) / (total + A(eps));
      T* o = out + row * n;
      for (int64_t j = 0; j < n; ++j) o[j] = T((u[j] + c) * inv);
    }
  });
}

at::Tensor softmax_with_policy_cpu(const at::Tensor& attn_in, const at::Tensor& policy_in, double eps) {
  check_inputs(attn_in, policy_in);
  const at::Tensor attn = attn_in.contiguous();
  const int64_t b = attn.size(0), h = attn.size(1), n = attn.size(2);
  const at::ScalarType acc = at::toOpMathType(attn.scalar_type());
  const at::Tensor policy = policy_in.to(acc).contiguous();
  at::Tensor out = at::empty(attn.sizes(), attn.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "softmax_with_policy", [&] {
    forward_kernel(attn.data_ptr<scalar_t>(), policy.data_ptr<at::opmath_type<scalar_t>>(),
                   out.data_ptr<scalar_t>(), b, h, n, eps);
  });
  return out;
}

template <typename T>
void backward_kernel(const T* grad, const T* attn, const at::opmath_type<T>* policy, T* grad_attn,
                     at::opmath_type<T>* grad_policy_bh, int64_t b, int64_t h, int64_t n, double eps) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> u(n), e(n);
    for (int64_t bh = begin; bh < end; ++bh) {
      const A* p = policy + (bh / h) * n;
      A* gp = grad_policy_bh == nullptr ? nullptr : grad_policy_bh + bh * n;
      if (gp != nullptr) std::fill(gp, gp + n, A(0));
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = bh * n + i;
        const T* a = attn + row * n;
        const T* g = grad + row * n;
        int64_t at = 0;
        const A total = row_weights(a, p, n, i, e.data(), u.data(), &at);
        const A c = A(eps) / A(n), inv = A(1) / (total + A(eps));
        A dot = 0, gsum = 0;
        for (int64_t j = 0; j < n; ++j) {
          dot += A(g[j]) * ((u[j] + c) * inv);
          gsum += A(g[j]);
        }
        if (grad_attn != nullptr) {
          T* ga = grad_attn + row * n;
          for (int64_t j = 0; j < n; ++j) ga[j] = T(u[j] * inv * (A(g[j]) - dot));
          ga[at] = T(A(ga[at]) + c * gsum * inv - dot * A(eps) * inv);
        }
        if (gp != nullptr) {
          for (int64_t j = 0; j < i; ++j) gp[j] += e[j] * (A(g[j]) - dot) * inv;
          for (int64_t j = i + 1; j < n; ++j) gp[j] += e[j] * (A(g[j]) - dot) * inv;  // q_i does not depend on p_i
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> softmax_with_policy_backward_cpu(const at::Tensor& grad_in,
                                                                   const at::Tensor& attn_in,
                                                                   const at::Tensor& policy_in, double eps,
                                                                   bool need_attn, bool need_policy) {
  check_inputs(attn_in, policy_in);
  DK_CHECK_CPU(grad_in);
  TORCH_CHECK(grad_in.sizes() == attn_in.sizes(), "grad must have attn's shape ", attn_in.sizes(), ", got ",
              grad_in.sizes());
  const at::Tensor attn = attn_in.contiguous(), grad = grad_in.to(attn.scalar_type()).contiguous();
  const int64_t b = attn.size(0), h = attn.size(1), n = attn.size(2);
  const at::ScalarType acc = at::toOpMathType(attn.scalar_type());
  const at::Tensor policy = policy_in.to(acc).contiguous();
  at::Tensor grad_attn = need_attn ? at::empty(attn.sizes(), attn.options()) : at::Tensor();
  at::Tensor per_head = need_policy ? at::empty({b, h, n}, attn.options().dtype(acc)) : at::Tensor();
  if (attn.numel() != 0 && (need_attn || need_policy)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "softmax_with_policy_backward",
                                    [&] {
                                      using A = at::opmath_type<scalar_t>;
                                      backward_kernel(grad.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
                                                      policy.data_ptr<A>(),
                                                      need_attn ? grad_attn.data_ptr<scalar_t>() : nullptr,
                                                      need_policy ? per_head.data_ptr<A>() : nullptr, b, h, n, eps);
                                    });
  }
  at::Tensor grad_policy;
  if (need_policy) {
    grad_policy = (attn.numel() == 0 ? at::zeros({b, n}, per_head.options()) : per_head.sum(1))
                      .to(policy_in.scalar_type())
                      .reshape({b, n, 1});
  }
  return {grad_attn, grad_policy};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("softmax_with_policy", &softmax_with_policy_cpu);
  m.impl("softmax_with_policy_backward", &softmax_with_policy_backward_cpu);
}
