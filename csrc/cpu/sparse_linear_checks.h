// Argument checks of sparse_linear shared by its CPU and CUDA kernels (csrc/cpu/sparse_linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace sparsekern {

// What the checks found: x is (..., in_features), viewed as (rows, in_features); y is `y_shape`.
struct SparseLinearShape {
  int64_t in_features;
  int64_t out_features;
  int64_t rows;  // product of x's leading dims (x.numel() / in_features fails for in_features == 0)
  std::vector<int64_t> y_shape;
};

// Checks the packed weight's tensors against x and bias: dtypes, shapes, devices. Not their
// contents: each kernel checks those where it reads them (csrc/cpu/sparse_linear.cpp, the CUDA kernel).
SparseLinearShape check_sparse_linear_args(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                                           const at::Tensor& chunk_offsets, const std::optional<at::Tensor>& bias);

// y when there is nothing to multiply (no rows, no outputs, or no columns: y is then the bias, or
// zeros); std::nullopt when the kernel must run.
std::optional<at::Tensor> sparse_linear_without_products(const SparseLinearShape& shape, const at::Tensor& x,
                                                         const std::optional<at::Tensor>& bias);

}  // namespace sparsekern
