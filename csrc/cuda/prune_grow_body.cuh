// The device passes of prune_grow (prune_grow.cu): what the two selections write and the body
// dispatch_float runs for a score type. Each float type's instantiation is compiled in a file of its
// own (prune_grow_<type>.cu), so that nvcc compiles the four in parallel: one file holding all four
// (19 kernels: per type a histogram, a tie count and two mask passes, the fused finishing pass the
// largest) was the longest compile of the CUDA build, two thirds of it in ptxas.
#pragma once

#include <cstdint>

#include "cuda/radix_select.cuh"
#include "cuda/radix_select.h"

namespace sparsekern::cuda::prune_grow_detail {

// What the finishing pass needs of each layer: its old mask, its new mask and its targets.
struct LayerOutputs {
  TensorRef old_mask;
  uint8_t* new_mask;
  int first_target;
  int num_targets;
};

__device__ __forceinline__ void write_zero(void* data, int bytes, int64_t offset) {
  switch (bytes) {
    case 2: static_cast<uint16_t*>(data)[offset] = 0; break;
    case 4: static_cast<uint32_t*>(data)[offset] = 0; break;
    default: static_cast<uint64_t*>(data)[offset] = 0; break;
  }
}

struct WriteKept {
  const LayerOutputs* layers;
  __device__ __forceinline__ void operator()(int tensor, int64_t i, bool selected) const { layers[tensor].new_mask[i] = selected; }
};

// new = kept | grown; targets like the weight become 0 off new and where they were inactive
// (newly grown entries, and entries off both masks); masked targets become 0 off new. The new mask
// holds `kept` until the thread handling an entry overwrites it.
struct Finish {
  const LayerOutputs* layers;
  const ZeroTarget* targets;
  const Strides* strides;
  __device__ __forceinline__ void operator()(int tensor, int64_t i, bool grown) const {
    const LayerOutputs& layer = layers[tensor];
    const bool now = layer.new_mask[i] != 0 || grown;
    const bool was = __ldg(static_cast<const uint8_t*>(layer.old_mask.data) +
                           radix::offset_of(layer.old_mask, strides, i)) != 0;
    layer.new_mask[i] = now;
    for (int t = layer.first_target; t < layer.first_target + layer.num_targets; ++t) {
      const ZeroTarget target = targets[t];
      if (!now || (target.like_weight && !was)) {
        write_zero(target.ref.data, target.bytes, radix::offset_of(target.ref, strides, i));
      }
    }
  }
};

struct PruneGrowBody {
  radix::SelectTable keep;
  radix::SelectTable grow;
  int num_segments;
  const radix::Workspace& workspace;
  WriteKept write_kept;
  Finish finish;
  cudaStream_t stream;

  // Runs the passes for one float type; compiled only in that type's file (see below).
  template <typename Bits, Bits kInfBits>
  cudaError_t operator()() const;
};

template <typename Bits, Bits kInfBits>
cudaError_t PruneGrowBody::operator()() const {
  const int last = radix::num_passes<Bits>();
  cudaError_t error = radix::run_passes<Bits, kInfBits>(keep, num_segments, 0, last, stream);
  if (error == cudaSuccess) error = radix::run_mask<Bits, kInfBits>(keep, workspace, write_kept, stream);
  if (error == cudaSuccess) error = radix::run_passes<Bits, kInfBits>(grow, num_segments, 0, last, stream);
  if (error == cudaSuccess) error = radix::run_mask<Bits, kInfBits>(grow, workspace, finish, stream);
  return error;
}

// Instantiated in prune_grow_float16.cu, prune_grow_bfloat16.cu, prune_grow_float32.cu and prune_grow_float64.cu
// only: other files that include this one leave the passes to them. The definition above is out of
// the class so as not to be inline: an inline one may be instantiated despite `extern template`.
extern template cudaError_t PruneGrowBody::operator()<uint16_t, radix::kFloat16Inf>() const;
extern template cudaError_t PruneGrowBody::operator()<uint16_t, radix::kBFloat16Inf>() const;
extern template cudaError_t PruneGrowBody::operator()<uint32_t, radix::kFloat32Inf>() const;
extern template cudaError_t PruneGrowBody::operator()<radix::u64, radix::kFloat64Inf>() const;

}  // namespace sparsekern::cuda::prune_grow_detail
