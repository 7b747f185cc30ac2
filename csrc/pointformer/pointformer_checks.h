// Argument checks of the Pointformer ops, shared by their CPU and CUDA glue.
#pragma once

#include "common/checks.h"

namespace dynkernels {
namespace pointformer {

// attn (B, M, H, R, S), grouped_xyz (B, 3, M, S), row_index (B, M) int64.
inline void check_refinement_args(const at::Tensor& attn, const at::Tensor& grouped_xyz, const at::Tensor& row_index) {
  DK_CHECK_DIM(attn, 5);
  DK_CHECK_DIM(grouped_xyz, 4);
  DK_CHECK_DIM(row_index, 2);
  TORCH_CHECK(attn.device() == grouped_xyz.device() && attn.device() == row_index.device(),
              "attn, grouped_xyz and row_index must be on one device");
  TORCH_CHECK(grouped_xyz.size(1) == 3, "grouped_xyz must be (B, 3, M, S), got ", grouped_xyz.sizes());
  TORCH_CHECK(attn.size(0) == grouped_xyz.size(0) && attn.size(1) == grouped_xyz.size(2) &&
                  attn.size(4) == grouped_xyz.size(3) && attn.size(2) >= 1,
              "attn must be (B, M, H, R, S) matching grouped_xyz ", grouped_xyz.sizes(), ", got ", attn.sizes());
  TORCH_CHECK(row_index.scalar_type() == at::kLong && row_index.size(0) == attn.size(0) &&
                  row_index.size(1) == attn.size(1),
              "row_index must be int64 (B, M), got ", row_index.scalar_type(), " ", row_index.sizes());
  TORCH_CHECK(attn.scalar_type() == grouped_xyz.scalar_type(), "attn and grouped_xyz must share a dtype");
}

}  // namespace pointformer
}  // namespace dynkernels
