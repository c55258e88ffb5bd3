// The device passes of topk_mask (topk_mask.cu): the body dispatch_float runs for a score type.
// Each float type's instantiation is compiled in a file of its own (topk_mask_<type>.cu), so that
// nvcc compiles the four in parallel, as prune_grow's (prune_grow_body.cuh).
#pragma once

#include <cstdint>

#include "cuda/radix_select.cuh"
#include "cuda/radix_select.h"

namespace sparsekern::cuda::topk_mask_detail {

using radix::SegmentState;

struct WriteMask {
  bool* const* masks;  // device table, one contiguous output per tensor
  __device__ __forceinline__ void operator()(int tensor, int64_t i, bool selected) const { masks[tensor][i] = selected; }
};

struct TopkBody {
  const radix::SelectTable& table;
  const radix::Workspace& workspace;
  bool* const* device_masks;
  int num_segments;
  SegmentState* pinned_states;
  int* short_segment;
  int64_t* available;
  const int64_t* numel_per_segment;
  cudaStream_t stream;

  // Runs the passes for one float type; compiled only in that type's file (see below).
  template <typename Bits, Bits kInfBits>
  cudaError_t operator()() const;
};

template <typename Bits, Bits kInfBits>
cudaError_t TopkBody::operator()() const {
  cudaError_t error = radix::run_passes<Bits, kInfBits>(table, num_segments, 0, 0, stream);
  if (error != cudaSuccess) return error;
  // NaN is never selected: a segment asking for more than its numbers must raise, before any
  // mask is written. The one read back of the op, into pinned memory.
  error = cudaMemcpyAsync(pinned_states, table.states, sizeof(SegmentState) * num_segments,
                          cudaMemcpyDeviceToHost, stream);
  if (error == cudaSuccess) error = cudaStreamSynchronize(stream);
  if (error != cudaSuccess) return error;
  for (int s = 0; s < num_segments; ++s) {
    const int64_t numbers = numel_per_segment[s] - int64_t(pinned_states[s].nan_count);
    if (pinned_states[s].k > numbers) {
      *short_segment = s;
      *available = numbers;
      return cudaSuccess;
    }
  }
  error = radix::run_passes<Bits, kInfBits>(table, num_segments, 1, radix::num_passes<Bits>(), stream);
  if (error != cudaSuccess) return error;
  return radix::run_mask<Bits, kInfBits>(table, workspace, WriteMask{device_masks}, stream);
}

// Instantiated in topk_mask_float16.cu, topk_mask_bfloat16.cu, topk_mask_float32.cu and topk_mask_float64.cu
// only: other files that include this one leave the passes to them. The definition above is out of
// the class so as not to be inline: an inline one may be instantiated despite `extern template`.
extern template cudaError_t TopkBody::operator()<uint16_t, radix::kFloat16Inf>() const;
extern template cudaError_t TopkBody::operator()<uint16_t, radix::kBFloat16Inf>() const;
extern template cudaError_t TopkBody::operator()<uint32_t, radix::kFloat32Inf>() const;
extern template cudaError_t TopkBody::operator()<radix::u64, radix::kFloat64Inf>() const;

}  // namespace sparsekern::cuda::topk_mask_detail
