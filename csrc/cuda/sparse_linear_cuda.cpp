// Torch glue of sparse_linear on CUDA: argument checks, allocation, current stream. The device code is torch-free in sparse_linear.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cpu/sparse_linear_checks.h"
#include "cuda/sparse_linear.h"

namespace sparsekern::cuda {

FloatType float_type(const at::Tensor& t, const char* name);  // topk_mask_cuda.cpp

namespace {

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                         const at::Tensor& chunk_offsets, const std::optional<at::Tensor>& bias) {
  const int64_t in_features = check_sparse_linear_args(x, bitmap, values, chunk_offsets, bias);
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor here, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t out_features = bitmap.size(0);
  const at::Tensor x2 = x.reshape({-1, in_features}).contiguous();
  const int64_t rows = x2.size(0);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  const at::Tensor bitmap_c = bitmap.contiguous(), values_c = values.contiguous();
  const at::Tensor offsets_c = chunk_offsets.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const cudaError_t error = sparse_linear_cuda(
      float_type(x, "x"), bitmap_c.data_ptr<int32_t>(), values_c.data_ptr(), offsets_c.data_ptr<int64_t>(),
      x2.data_ptr(), bias_c.defined() ? bias_c.data_ptr() : nullptr, y.data_ptr(), out_features,
      in_features, rows, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "sparsekern::sparse_linear CUDA kernel failed: ", cudaGetErrorString(error));
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("sparse_linear", &sparse_linear); }

}  // namespace sparsekern::cuda
