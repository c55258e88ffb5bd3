// Torch glue of topk_mask / topk_mask_per_tensor on CUDA: argument checks, allocation, current
// stream. The device code is torch-free in topk_mask.cu (declared in radix_select.h). Scores of any
// strides are read in place.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cpu/score_checks.h"
#include "cuda/radix_select.h"
#include "cuda/select_glue.h"

namespace sparsekern::cuda {

FloatType float_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kFloat: return FloatType::kFloat32;
    case at::kDouble: return FloatType::kFloat64;
    default: TORCH_CHECK_TYPE(false, name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
}

namespace {

void check_scores(at::TensorList scores) {
  check_score_dtypes(scores);
  for (size_t i = 0; i < scores.size(); ++i) {
    TORCH_CHECK_VALUE(scores[i].is_cuda() && scores[i].device() == scores[0].device(), "scores[", i,
                      "] is on ", scores[i].device(), " but this kernel runs on ", scores[0].device());
  }
}

// Runs one selection per segment; segment_of_tensor maps each tensor to its segment.
std::vector<at::Tensor> select(at::TensorList scores, const std::vector<int>& segment_of_tensor,
                               const std::vector<int64_t>& k, const char* k_name) {
  std::vector<at::Tensor> masks;
  if (scores.empty()) return masks;
  const c10::cuda::CUDAGuard guard(scores[0].device());
  TensorRefs refs;
  std::vector<TensorRef> score_refs;
  std::vector<bool*> mask_pointers;
  std::vector<int64_t> numels;
  for (const at::Tensor& s : scores) {
    score_refs.push_back(refs.add(s, /*written=*/false));
    masks.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
    mask_pointers.push_back(masks.back().data_ptr<bool>());
    numels.push_back(s.numel());
  }
  const int num_tensors = static_cast<int>(scores.size());
  const int num_segments = static_cast<int>(k.size());
  const FloatType type = float_type(scores[0], "scores");
  const size_t bytes = topk_mask_workspace_bytes(type, numels.data(), num_tensors, num_segments, refs.num_strides());
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, scores[0].options().dtype(at::kByte));
  at::Tensor pinned = at::empty({static_cast<int64_t>(topk_mask_pinned_bytes(num_segments))},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  int short_segment = -1;
  int64_t available = 0;
  const cudaError_t error = topk_mask_cuda(
      type, score_refs.data(), mask_pointers.data(), numels.data(), num_tensors, segment_of_tensor.data(),
      k.data(), num_segments, refs.strides(), refs.num_strides(), workspace.data_ptr(), bytes, pinned.data_ptr(),
      &short_segment, &available, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "sparsekern::topk_mask CUDA kernels failed: ", cudaGetErrorString(error));
  TORCH_CHECK_VALUE(short_segment < 0, k_name, "=", k[short_segment < 0 ? 0 : short_segment],
                    " is more than the ", available, " non-NaN scores available");
  return masks;
}

std::vector<at::Tensor> topk_mask(at::TensorList scores, int64_t k) {
  check_scores(scores);
  check_global_k(scores, k);
  return select(scores, std::vector<int>(scores.size(), 0), {k}, "k");
}

std::vector<at::Tensor> topk_mask_per_tensor(at::TensorList scores, at::IntArrayRef k) {
  check_scores(scores);
  check_per_tensor_k(scores, k);
  std::vector<int> segment_of_tensor(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) segment_of_tensor[i] = static_cast<int>(i);
  return select(scores, segment_of_tensor, k.vec(), "k");
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("topk_mask", &topk_mask);
  m.impl("topk_mask_per_tensor", &topk_mask_per_tensor);
}

}  // namespace sparsekern::cuda
