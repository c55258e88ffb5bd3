// Torch glue of prune_grow on CUDA (same C++ signature as the CPU kernel, which the dispatcher
// requires): argument checks, allocation, current stream, in-place results
// for non-contiguous weight/state. The device code is torch-free in prune_grow.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/radix_select.h"

namespace sparsekern::cuda {

FloatType float_type(const at::Tensor& t, const char* name);  // topk_mask_cuda.cpp

namespace {

void check_like(const at::Tensor& t, const char* name, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(t.sizes() == weight.sizes(), name, " must have the shape of weight ", weight.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == weight.device(), name, " is on ", t.device(), " but weight is on ",
                    weight.device());
}

at::Tensor prune_grow(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& prune_score,
                      const at::Tensor& grow_score, int64_t n, at::TensorList state) {
  float_type(weight, "weight");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask.scalar_type());
  check_like(mask, "mask", weight);
  check_like(prune_score, "prune_score", weight);
  check_like(grow_score, "grow_score", weight);
  const FloatType score_type = float_type(prune_score, "prune_score");
  TORCH_CHECK_TYPE(grow_score.scalar_type() == prune_score.scalar_type(), "grow_score has dtype ",
                   grow_score.scalar_type(), " but prune_score has ", prune_score.scalar_type());
  for (size_t i = 0; i < state.size(); ++i) {
    float_type(state[i], "state");
    check_like(state[i], "state", weight);
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  // The bound on n needs the active count: one reduction and a host read, as the contract asks
  // for the error before anything changes.
  const int64_t numel = weight.numel();
  const int64_t active = mask.sum().item<int64_t>();
  const int64_t bound = std::min(active, numel - active);
  TORCH_CHECK_VALUE(0 <= n && n <= bound, "n must be in [0, ", bound, "] (mask has ", active,
                    " active and ", numel - active, " inactive entries), got ", n);

  const at::Tensor mask_c = mask.contiguous();
  const at::Tensor prune_c = prune_score.contiguous();
  const at::Tensor grow_c = grow_score.contiguous();
  at::Tensor weight_c = weight.contiguous();
  std::vector<at::Tensor> state_c;
  std::vector<void*> state_pointers;
  std::vector<int> state_bytes;
  for (const at::Tensor& s : state) {
    state_c.push_back(s.contiguous());
    state_pointers.push_back(state_c.back().data_ptr());
    state_bytes.push_back(static_cast<int>(s.element_size()));
  }
  at::Tensor new_mask = at::empty(weight.sizes(), mask.options().memory_format(at::MemoryFormat::Contiguous));
  const int num_state = static_cast<int>(state.size());
  const size_t bytes = prune_grow_workspace_bytes(score_type, numel, num_state);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, weight.options().dtype(at::kByte));
  const cudaError_t error = prune_grow_cuda(
      score_type, prune_c.data_ptr(), grow_c.data_ptr(), mask_c.data_ptr<bool>(), numel, n,
      weight_c.data_ptr(), static_cast<int>(weight.element_size()), state_pointers.data(),
      state_bytes.data(), num_state, new_mask.data_ptr<bool>(), workspace.data_ptr(), bytes,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "sparsekern::prune_grow CUDA kernels failed: ", cudaGetErrorString(error));
  // Non-contiguous inputs were worked on in copies: write the results back in place.
  if (!weight_c.is_same(weight)) weight.copy_(weight_c);
  for (size_t i = 0; i < state.size(); ++i) {
    if (!state_c[i].is_same(state[i])) state[i].copy_(state_c[i]);
  }
  return new_mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("prune_grow", &prune_grow); }

}  // namespace sparsekern::cuda
