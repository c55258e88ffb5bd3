// Argument checks of the score ops (topk_mask, topk_mask_per_tensor, prune_grow) shared by their CPU
// kernels (csrc/cpu) and CUDA kernels (csrc/cuda/*_cuda.cpp), so a direct torch.ops call raises the
// same TypeError / ValueError on either device. Device checks stay with each kernel.
#pragma once

#include <ATen/ATen.h>

namespace sparsekern {

// The score dtypes every backend accepts.
inline bool is_score_dtype(c10::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

// Every score tensor is float16, bfloat16, float32 or float64, and all share scores[0]'s dtype.
inline void check_score_dtypes(at::TensorList scores) {
  for (size_t i = 0; i < scores.size(); ++i) {
    const auto dtype = scores[i].scalar_type();
    TORCH_CHECK_TYPE(is_score_dtype(dtype), "scores[", i, "] must be float16, bfloat16, float32 or float64, got ", dtype);
    TORCH_CHECK_TYPE(dtype == scores[0].scalar_type(), "scores[", i, "] has dtype ", dtype,
                     " but scores[0] has ", scores[0].scalar_type());
  }
}

// k of one global selection: in [0, total entries of the list].
inline void check_global_k(at::TensorList scores, int64_t k) {
  int64_t total = 0;
  for (const at::Tensor& s : scores) total += s.numel();
  TORCH_CHECK_VALUE(0 <= k && k <= total, "k must be in [0, ", total, "], got ", k);
}

// k of per-tensor selections: one entry per tensor, each in [0, that tensor's entries].
inline void check_per_tensor_k(at::TensorList scores, at::IntArrayRef k) {
  TORCH_CHECK_VALUE(k.size() == scores.size(), "k has ", k.size(), " entries but scores has ",
                    scores.size(), " tensors");
  for (size_t i = 0; i < k.size(); ++i) {
    TORCH_CHECK_VALUE(0 <= k[i] && k[i] <= scores[i].numel(), "k[", i, "] must be in [0, ",
                      scores[i].numel(), "], got ", k[i]);
  }
}

}  // namespace sparsekern
