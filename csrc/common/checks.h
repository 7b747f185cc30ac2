// Argument checks shared by the torch glue of every op family. Python
// validates user input first with friendlier messages; these guard the ops
// when they are called directly through torch.ops.dynkernels.
#pragma once

#include <torch/extension.h>

#define DK_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define DK_CHECK_CPU(x) DK_CHECK_DEVICE(x, at::kCPU)
#define DK_CHECK_CUDA(x) DK_CHECK_DEVICE(x, at::kCUDA)
#define DK_CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dims, got shape ", (x).sizes())
#define DK_CHECK_POINTS(x)                                                                                  \
  do {                                                                                                      \
    DK_CHECK_DIM(x, 3);                                                                                     \
    TORCH_CHECK((x).size(2) == 3, #x " must have shape (B, N, 3), got ", (x).sizes());                      \
    TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " must be a floating tensor, got ", (x).scalar_type()); \
  } while (0)
#define DK_CHECK_INDEX_DTYPE(x)                                                            \
  TORCH_CHECK((x).scalar_type() == at::kInt || (x).scalar_type() == at::kLong, #x         \
              " must be int32 or int64, got ", (x).scalar_type())
