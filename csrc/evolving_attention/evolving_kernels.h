// Launchers of the Evolving Attention CUDA kernels (no ATen: the glue in
// evolve_logits_cuda.cpp calls these with raw pointers).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/scalar_kind.h"

namespace dynkernels {
namespace cuda {

struct EvolveShape {
  int64_t b, h, n, k;  // logits (B, H, N, N), weight (H, H, K, K)
};
struct EvolveMask {
  int64_t sb, sh, si, sj;  // element strides of the expanded additive mask
};
struct EvolveParams {
  double w_prev, w_conv, slope;
  int act;  // 0 identity, 1 relu, 2 leaky_relu
};

// Query rows per block of backward kernel 1 (the partials' granularity).
int64_t evolve_rows_per_block();
// Dynamic shared memory one block needs (acc_bytes: 4 for float arithmetic, 8 for double).
size_t evolve_smem_bytes(const EvolveShape& s, bool backward, size_t acc_bytes);

// (A, P) from logits, prev (may be null), weight, bias (may be null), mask (may be null).
cudaError_t launch_evolve_attention_logits(ScalarKind kind, const void* logits, const void* prev, const void* weight,
                                           const void* bias, const void* mask, EvolveMask mv, EvolveShape s,
                                           EvolveParams prm, void* evolved, void* probs, cudaStream_t stream);

// dz, dm: (B, H, N, N) scratch in the compute type; partial: (blocks, H*H*K*K + H) in the compute type,
// blocks = B * ceil(N / evolve_rows_per_block()); flipped: W'[hi, ho, a, c] = W[ho, hi, K-1-a, K-1-c];
// mask (may be null): the forward's; keys it sets to -inf pass no gradient.
cudaError_t launch_evolve_attention_logits_backward(ScalarKind kind, const void* grad_evolved, const void* grad_probs,
                                                    const void* logits, const void* prev, const void* weight,
                                                    const void* flipped, const void* bias, const void* probs,
                                                    const void* mask, EvolveMask mv, EvolveShape s, EvolveParams prm,
                                                    void* dz, void* dm, void* partial, void* d_logits, void* d_prev,
                                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace dynkernels
