// Torch glue shared by topk_mask_cuda.cpp and prune_grow_cuda.cpp: dtypes to the kernels' float
// types, and tensors of any strides to the TensorRefs the kernels read and write in place.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cuda/radix_select.h"

namespace sparsekern::cuda {

// The kernels' float type of a tensor's dtype (TypeError naming `name` otherwise). Defined in
// topk_mask_cuda.cpp; sparse_linear_cuda.cpp uses it too.
FloatType float_type(const at::Tensor& t, const char* name);

// The TensorRefs of one call and the strides they point into. A tensor is addressed in place:
// contiguous ones directly, others through their sizes and strides (dimensions of size 1 dropped,
// neighbours that step as one merged: channels-last (O, I, H, W) becomes (O, I, H*W)). Only a
// non-contiguous tensor of 2^32 entries or more, or with more than kMaxDims such dimensions, is
// copied (and, when written, copied back by write_back()).
class TensorRefs {
 public:
  TensorRef add(const at::Tensor& t, bool written) {
    if (t.is_contiguous()) return TensorRef{t.data_ptr(), -1};
    Strides layout{};
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (t.size(d) == 1) continue;
      if (layout.dims > 0 && layout.strides[layout.dims - 1] == t.stride(d) * t.size(d)) {
        layout.sizes[layout.dims - 1] *= t.size(d);
        layout.strides[layout.dims - 1] = t.stride(d);
      } else if (layout.dims < kMaxDims) {
        layout.sizes[layout.dims] = t.size(d);
        layout.strides[layout.dims] = t.stride(d);
        ++layout.dims;
      } else {
        return copy(t, written);
      }
    }
    if (t.numel() >= kMaxStridedNumel) return copy(t, written);
    strides_.push_back(layout);
    return TensorRef{t.data_ptr(), static_cast<int>(strides_.size()) - 1};
  }

  const Strides* strides() const { return strides_.data(); }
  int num_strides() const { return static_cast<int>(strides_.size()); }

  // Copies the results of written tensors that were worked on in a contiguous copy back in place.
  void write_back() {
    for (auto& [original, copy] : copies_) original.copy_(copy);
  }

 private:
  TensorRef copy(const at::Tensor& t, bool written) {
    at::Tensor contiguous = t.contiguous();
    if (written) copies_.emplace_back(t, contiguous);
    kept_.push_back(contiguous);
    return TensorRef{contiguous.data_ptr(), -1};
  }

  std::vector<Strides> strides_;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies_;
  std::vector<at::Tensor> kept_;  // read-only copies stay alive until the kernels are queued
};

}  // namespace sparsekern::cuda
