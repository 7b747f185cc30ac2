// dynkernels._C: module init and the whole op surface, in one place.
//
// Every op's schema is defined here; each backend registers its kernels with
// TORCH_LIBRARY_IMPL next to the kernel (csrc/<family>/<op>_{cpu,cuda}.cpp).
// Fake (meta) kernels and autograd are registered in Python
// (dynkernels/ops/<family>.py), so every op works under torch.compile.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef DYNKERNELS_TORCH_VERSION
#define DYNKERNELS_TORCH_VERSION "unknown"
#endif
#ifndef DYNKERNELS_CUDA_ARCH_LIST
#define DYNKERNELS_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(dynkernels, m) {
  // ---- segment substrate (shared by the families; dynkernels/ops/segment.py) ----
  // src (M, D), offsets (S + 1,) int64, perm (P,) int64 or None, reduce "sum" | "mean" | "max"
  // -> (S, D): segment s is rows perm[offsets[s] .. offsets[s + 1] - 1] of src (rows
  // offsets[s] .. of src itself without perm), in that order (deterministic); empty segments give 0.
  m.def("segment_reduce(Tensor src, Tensor offsets, Tensor? perm, str reduce) -> Tensor");
  // src (M, D), index (M,) int32/int64 -> (num_segments, D): out[s] = reduce over the rows i with
  // index[i] == s (indices outside [0, num_segments) are dropped). CPU: every reduce, in row
  // order (deterministic); CUDA: "sum" only, by atomics.
  m.def("scatter_reduce(Tensor src, Tensor index, SymInt num_segments, str reduce) -> Tensor");

  // ---- pointops (mmcv layout: xyz (B, N, 3), features (B, C, N)) ----
  // (B, N, 3) float -> (B, num_points) int64, exact FPS, ties to the lowest index.
  m.def("furthest_point_sample(Tensor xyz, int num_points, int start_index) -> Tensor");
  // (B, N, 3), (B, M, 3) -> (B, M, num_samples) int64; -1 rows for empty balls.
  m.def("ball_query(Tensor xyz, Tensor centers, float min_radius, float radius, int num_samples) -> Tensor");
  // (B, C, N) features, (B, K) int32/int64 idx -> (B, C, K); idx -1 reads zero.
  m.def("gather_features(Tensor features, Tensor idx, bool deterministic) -> Tensor");
  // grad (B, C, K) -> (B, C, num_points); deterministic selects the atomic-free CUDA path.
  m.def("gather_features_backward(Tensor grad_out, Tensor idx, SymInt num_points, bool deterministic) -> Tensor");
  // (B, N, 3), (B, M, 3) -> (dist2 (B, M, k), idx (B, M, k) int64), ascending, ties to the lower index.
  m.def("knn(Tensor xyz, Tensor centers, int k) -> (Tensor, Tensor)");
  // (B, C, m) features, (B, n, 3) idx, (B, n, 3) weight -> (B, C, n).
  m.def("three_interpolate(Tensor features, Tensor idx, Tensor weight, bool deterministic) -> Tensor");
  // grad (B, C, n) -> grad_features (B, C, num_points).
  m.def("three_interpolate_backward(Tensor grad_out, Tensor idx, Tensor weight, SymInt num_points, "
        "bool deterministic) -> Tensor");

  // ---- pointformer ----
  // attn (B, M, H, R, S), grouped_xyz (B, 3, M, S), row_index (B, M) int64 in [-1, R) -> (B, M, 3).
  m.def("coordinate_refinement(Tensor attn, Tensor grouped_xyz, Tensor row_index) -> Tensor");
  // -> (grad_attn, grad_grouped_xyz)
  m.def("coordinate_refinement_backward(Tensor grad_out, Tensor attn, Tensor grouped_xyz, Tensor row_index) "
        "-> (Tensor, Tensor)");
  // q, k, v (G, H, S, D), row_index (G,) int64 in [-1, S) or empty -> (out (G, H, S, D), weights (G, S), lse (G, H, S)).
  m.def("local_attention(Tensor q, Tensor k, Tensor v, Tensor row_index) -> (Tensor, Tensor, Tensor)");
  // -> (dq, dk, dv)
  m.def("local_attention_backward(Tensor grad_out, Tensor grad_weights, Tensor q, Tensor k, Tensor v, Tensor lse, "
        "Tensor row_index) -> (Tensor, Tensor, Tensor)");
  // qkv (G, S, 3*H*D) packed as one input projection gives it -> (out (G, S, H*D), weights (G, S), lse (G, H, S)).
  m.def("local_attention_packed(Tensor qkv, int heads, Tensor row_index) -> (Tensor, Tensor, Tensor)");
  // -> dqkv (G, S, 3*H*D)
  m.def("local_attention_packed_backward(Tensor grad_out, Tensor grad_weights, Tensor qkv, int heads, Tensor lse, "
        "Tensor row_index) -> Tensor");

  // ---- evolving attention ----
  // logits, prev (B, H, N, N), weight (H, H, K, K), bias (H), activation 0/1/2 (identity/relu/leaky_relu),
  // mask additive expanded to (B, H, N, N) -> (evolved (B, H, N, N), probs (B, H, N, N)).
  m.def("evolve_attention_logits(Tensor logits, Tensor? prev_logits, Tensor weight, Tensor? bias, float w_prev, "
        "float w_conv, int activation, float negative_slope, Tensor? mask) -> (Tensor, Tensor)");
  // evolved: the forward's A (the CPU kernel reads act'(Z) off it where that is exact, instead of
  // recomputing the convolution); mask: the forward's (keys it sets to -inf pass no gradient)
  // -> (d_logits, d_prev (empty without prev), d_weight, d_bias (empty without bias))
  m.def("evolve_attention_logits_backward(Tensor? grad_evolved, Tensor? grad_probs, Tensor logits, "
        "Tensor? prev_logits, Tensor weight, Tensor? bias, Tensor probs, Tensor evolved, float w_prev, float w_conv, "
        "int activation, float negative_slope, Tensor? mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // ---- dynamic convolution ----
  // x (B, C, H, W), kernels (B, C, kh, kw): every (sample, channel) plane its own kernel; bias (B, C) or None;
  // stride, padding, dilation as F.conv2d -> (B, C, Ho, Wo).
  m.def("per_sample_depthwise_conv2d(Tensor x, Tensor kernels, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation) -> Tensor");
  // -> (grad_x, grad_kernels, grad_bias (empty without bias))
  m.def("per_sample_depthwise_conv2d_backward(Tensor grad, Tensor x, Tensor kernels, bool with_bias, int[2] stride, "
        "int[2] padding, int[2] dilation) -> (Tensor, Tensor, Tensor)");
  // x (B, Cin, H, W), kernels (B, Cout, Cin / groups, kh, kw): every sample its own grouped conv;
  // bias (B, Cout) or None -> (B, Cout, Ho, Wo), channels-last for a channels-last x.
  m.def("per_sample_conv2d(Tensor x, Tensor kernels, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups) -> Tensor");
  // -> (grad_x, grad_kernels, grad_bias (empty without bias))
  m.def("per_sample_conv2d_backward(Tensor grad, Tensor x, Tensor kernels, bool with_bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor, Tensor)");
  // ---- sparse execution ----
  // mask (B, 1, H, W) bool; halo >= 0 dilates it by a (2 halo + 1)^2 square; capacity < 0: exact size
  // -> (index (capacity or count,) int64 flat b*H*W + y*W + x, -1 padded; count () int64;
  //     inverse (B, H, W) int64 row or -1, (0, H, W) without with_inverse)
  m.def("mask_to_index(Tensor mask, int halo, int capacity, bool with_inverse) -> (Tensor, Tensor, Tensor)");
  // x (B, C, H, W) either layout, index (P,) int64 in [-1, B*H*W) -> rows (P, C), zero where index is -1
  m.def("gather_pixels(Tensor x, Tensor index) -> Tensor");
  // a copy of out (B, C, H, W) with rows (P, C) set (mode 0) or added (mode 1) at index; -1 dropped
  m.def("scatter_pixels(Tensor rows, Tensor index, Tensor out, int mode) -> Tensor");
  // rows (P_in, C) at the input mask's pixels, inverse (B, H, W) int64 row or -1, out_index (P_out,) flat
  // output pixels (b*Ho*Wo + y*Wo + x, -1 padding), weight (C, 1, kh, kw), bias (C) or None -> (P_out, C)
  m.def("masked_depthwise_conv2d(Tensor rows, Tensor inverse, Tensor out_index, Tensor weight, Tensor? bias, "
        "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // -> (grad_rows, grad_weight, grad_bias (empty without bias))
  m.def("masked_depthwise_conv2d_backward(Tensor grad, Tensor rows, Tensor inverse, Tensor out_index, Tensor weight, "
        "bool with_bias, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor, Tensor, Tensor)");
  // dense kh x kw conv (groups 1) at out_index pixels, rows read through inverse; weight (Cout, Cin, kh, kw)
  m.def("masked_conv2d(Tensor rows, Tensor inverse, Tensor out_index, Tensor weight, Tensor? bias, "
        "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // -> (grad_rows, grad_weight, grad_bias (empty without bias))
  m.def("masked_conv2d_backward(Tensor grad, Tensor rows, Tensor inverse, Tensor out_index, Tensor weight, "
        "bool with_bias, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor, Tensor, Tensor)");
  // ---- token routing ----
  // ToMe's matching: a (B, N_a, C), b (B, N_b, C) row-normalised; r in [0, N_a]
  // -> (src_idx (B, r), dst_idx (B, r), unm_idx (B, N_a - r)) int64
  m.def("tome_match(Tensor a, Tensor b, int r, bool class_token, bool distill_token) -> (Tensor, Tensor, Tensor)");
  // MoE: experts (T, k) int64 -> (source (R,), slot_row (T, k), offsets (E + 1,), counts (E,)) int64;
  // capacity < 0: dropless (R = T k), else R = E capacity (see csrc/token_routing/moe_cpu.cpp)
  m.def("moe_plan(Tensor experts, int num_experts, int capacity) -> (Tensor, Tensor, Tensor, Tensor)");
  // rows of x (T, d) at source (R,) -> (R, d), zero rows for -1 (slot_row: for the gradient)
  m.def("moe_gather(Tensor x, Tensor source, Tensor slot_row) -> Tensor");
  // y (R, d), slot_row (T, k), weights (T, k) -> (T, d); backward -> (grad_y, grad_weights)
  m.def("moe_combine(Tensor y, Tensor slot_row, Tensor weights) -> Tensor");
  m.def("moe_combine_backward(Tensor grad, Tensor y, Tensor slot_row, Tensor weights, bool need_y, bool need_weights) -> (Tensor, Tensor)");
  // x (R, d_in) in expert segments offsets (E + 1,), w (E, d_in, d_out), bias (E, d_out) -> (R, d_out)
  m.def("moe_grouped_mm(Tensor x, Tensor w, Tensor offsets, Tensor? bias) -> Tensor");
  m.def("moe_grouped_mm_backward(Tensor grad, Tensor x, Tensor w, Tensor offsets, bool need_x, bool need_w, bool need_bias) -> (Tensor, Tensor, Tensor)");
  // DynamicViT's softmax_with_policy: attn (B, H, N, N) logits, policy (B, N, 1) -> (B, H, N, N);
  // backward -> (grad_attn, grad_policy (B, N, 1)) (see csrc/token_routing/policy_softmax_cpu.cpp)
  m.def("softmax_with_policy(Tensor attn, Tensor policy, float eps) -> Tensor");
  m.def("softmax_with_policy_backward(Tensor grad, Tensor attn, Tensor policy, float eps, bool need_attn, bool need_policy) -> (Tensor, Tensor)");
  // ---- early exit ----
  // GFNet's focus patches: images (B, C, H, W), actions (B, 2) in [0, 1] -> (B, C, P, P), the window at
  // (floor(a_y (H - P)), floor(a_x (W - P))); channels-last in, channels-last out; index (n,): patch s from
  // image index[s] (actions (n, 2), no gradient). Backward (no index) -> (B, C, H, W).
  m.def("crop_patches(Tensor images, Tensor actions, Tensor? index, int patch_size) -> Tensor");
  m.def("crop_patches_backward(Tensor grad, Tensor actions, int height, int width) -> Tensor");
  // ---- FDIT ----
  // The frequency pixel loss of fake, real (N, 3, H, W) with the 1-D Gaussian kernel (k,), weights
  // (w_low, w_high) -> 0-d; backward -> d loss / d fake (the gradient to real is its negative).
  m.def("frequency_pixel_loss(Tensor fake, Tensor real, Tensor kernel, float w_low, float w_high) -> Tensor");
  m.def("frequency_pixel_loss_backward(Tensor grad, Tensor fake, Tensor real, Tensor kernel, float w_low, float w_high) -> Tensor");
  // The spectral loss's elementwise part on rfft2 spectra a, b (complex, one shape) with weights of period
  // P (dividing the size) -> (loss 0-d, sign(d) int8); backward -> the complex gradient for a (direction 1)
  // or b (direction -1) (see csrc/fdit/spectral_l1_cpu.cpp).
  m.def("spectral_l1(Tensor a, Tensor b, Tensor weights, float total) -> (Tensor, Tensor)");
  m.def("spectral_l1_backward(Tensor grad, Tensor spectrum, Tensor sign, Tensor weights, float total, float direction) -> Tensor");
  // ---- Auto Seg-Loss ----
  // Region surrogates' per-class statistics of logits (N, C, H, W) with labels (N, H, W) (int64, int32
  // or uint8), an optional uint8 region (N, H, W) (BIoU's trimap) and Bezier curves theta_i, theta_u
  // (4M - 2 numbers each; theta_u may be empty) -> (3, C): sum m h_i(s_c) [l == c], sum m h_u(s_c)
  // [l != c], sum m [l == c] (float; double for double logits). Backward from (3, C) -> d / d logits
  // (see csrc/auto_seg_loss/surrogate_stats_cpu.cpp).
  m.def("surrogate_stats(Tensor logits, Tensor target, Tensor? region, Tensor theta_i, Tensor theta_u, int ignore_index) -> Tensor");
  m.def("surrogate_stats_backward(Tensor grad, Tensor logits, Tensor target, Tensor? region, Tensor theta_i, Tensor theta_u, int ignore_index) -> Tensor");
  // ---- ISDA ----
  // In place: the estimator (cov (C, A, A), mean (C, A), amount (C,)) merges the batch's
  // per-class population moments (features (N, A), labels (N,) int64); cov stays exactly symmetric.
  m.def("isda_update_full_(Tensor(a!) cov, Tensor(b!) mean, Tensor(c!) amount, Tensor features, Tensor labels) -> ()");
  // The same for a diagonal covariance var (C, A): per-class sums in row order (deterministic).
  m.def("isda_update_diagonal_(Tensor(a!) var, Tensor(b!) mean, Tensor(c!) amount, Tensor features, Tensor labels) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dynkernels C++/CUDA kernels; the ops live in torch.ops.dynkernels";
  m.def("built_torch_version", [] { return std::string(DYNKERNELS_TORCH_VERSION); },
        "torch version this extension was compiled against");
  m.def("with_cuda", [] {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether CUDA kernels were compiled in");
  m.def("cuda_arch_list", [] { return std::string(DYNKERNELS_CUDA_ARCH_LIST); },
        "TORCH_CUDA_ARCH_LIST used for the CUDA build (empty for CPU builds)");
}
