// Torch glue of sparse_linear on CUDA: argument checks, allocation, current stream. The device code
// is torch-free in sparse_linear.cu, which also checks the packed layout's contents as it reads them
// (here they would cost a synchronization per call).
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
  const SparseLinearShape shape = check_sparse_linear_args(x, bitmap, values, chunk_offsets, bias);
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor here, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  if (auto y = sparse_linear_without_products(shape, x, bias)) return *y;
  const FloatType type = float_type(x, "x");
  const at::Tensor x2 = x.reshape({shape.rows, shape.in_features}).contiguous();
  at::Tensor y = at::empty({shape.rows, shape.out_features}, x.options());
  const at::Tensor bitmap_c = bitmap.contiguous(), values_c = values.contiguous();
  const at::Tensor offsets_c = chunk_offsets.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const size_t workspace_bytes =
      sparse_linear_workspace_bytes(type, shape.out_features, shape.in_features, shape.rows);
  const at::Tensor workspace = workspace_bytes == 0 ? at::Tensor()
      : at::empty({static_cast<int64_t>(workspace_bytes)}, x.options().dtype(at::kByte));
  const cudaError_t error = sparse_linear_cuda(
      type, bitmap_c.data_ptr<int32_t>(), values_c.data_ptr(), values_c.numel(), offsets_c.data_ptr<int64_t>(),
      x2.data_ptr(), bias_c.defined() ? bias_c.data_ptr() : nullptr, y.data_ptr(),
      workspace.defined() ? workspace.data_ptr() : nullptr, shape.out_features, shape.in_features, shape.rows,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "sparsekern::sparse_linear CUDA kernel failed: ", cudaGetErrorString(error));
  return y.view(shape.y_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("sparse_linear", &sparse_linear); }

}  // namespace sparsekern::cuda
