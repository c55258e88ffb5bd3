// Argument checks of sparse_linear shared by its CPU and CUDA kernels (csrc/cpu/sparse_linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace sparsekern {

// Checks the packed weight's tensors against x and bias; returns in_features (x's last dim).
int64_t check_sparse_linear_args(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                                 const at::Tensor& chunk_offsets, const std::optional<at::Tensor>& bias);

}  // namespace sparsekern
