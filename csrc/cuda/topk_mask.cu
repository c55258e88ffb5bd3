// topk_mask on CUDA: one radix select per segment over a list of tensors, all segments in the
// same launches (global selection: one segment; per-tensor variant: one segment per tensor).
// Torch-free; the torch glue is topk_mask_cuda.cpp. Pass structure and cost: README.md here.
#include <vector>

#include "cuda/radix_select.cuh"
#include "cuda/radix_select.h"

namespace sparsekern::cuda {
namespace {

using radix::SegmentState;
using radix::TensorEntry;

struct WriteMask {
  bool* const* masks;  // device table, one output per tensor
  __device__ void operator()(int tensor, int64_t i, bool selected) const { masks[tensor][i] = selected; }
};

struct TopkBody {
  const radix::SelectTable& table;
  const radix::Workspace& workspace;
  bool* const* device_masks;
  int num_segments;
  int* short_segment;
  int64_t* available;
  const int64_t* numel_per_segment;
  cudaStream_t stream;

  template <typename Bits, Bits kInfBits>
  cudaError_t operator()() const {
    cudaError_t error = radix::run_passes<Bits, kInfBits>(table, num_segments, 0, 0, stream);
    if (error != cudaSuccess) return error;
    // NaN is never selected: a segment asking for more than its numbers must raise, before any
    // mask is written.
    std::vector<SegmentState> states(num_segments);
    error = cudaMemcpyAsync(states.data(), workspace.states, sizeof(SegmentState) * num_segments,
                            cudaMemcpyDeviceToHost, stream);
    if (error == cudaSuccess) error = cudaStreamSynchronize(stream);
    if (error != cudaSuccess) return error;
    for (int s = 0; s < num_segments; ++s) {
      const int64_t numbers = numel_per_segment[s] - int64_t(states[s].nan_count);
      if (states[s].k > numbers) {
        *short_segment = s;
        *available = numbers;
        return cudaSuccess;
      }
    }
    error = radix::run_passes<Bits, kInfBits>(table, num_segments, 1, radix::num_passes<Bits>(), stream);
    if (error != cudaSuccess) return error;
    return radix::run_mask<Bits, kInfBits>(table, workspace, WriteMask{device_masks}, stream);
  }
};

int64_t total_tiles(const int64_t* numels, int num_tensors) {
  int64_t tiles = 0;
  for (int t = 0; t < num_tensors; ++t) tiles += radix::tiles_of(numels[t]);
  return tiles;
}

size_t candidate_bytes(FloatType type, const int64_t* numels, int num_tensors, int num_segments) {
  int64_t total = 0;
  for (int t = 0; t < num_tensors; ++t) total += numels[t];
  return radix::candidate_capacity(type, total, num_segments) * radix::key_bytes(type);
}

}  // namespace

size_t topk_mask_workspace_bytes(FloatType type, const int64_t* numels, int num_tensors, int num_segments) {
  return radix::layout_workspace(nullptr, num_tensors, num_segments, total_tiles(numels, num_tensors), 1,
                                 candidate_bytes(type, numels, num_tensors, num_segments),
                                 sizeof(bool*) * num_tensors, nullptr);
}

cudaError_t topk_mask_cuda(FloatType type, const void* const* scores, bool* const* masks,
                           const int64_t* numels, int num_tensors, const int* segment_of_tensor,
                           const int64_t* k_per_segment, int num_segments, void* workspace,
                           size_t workspace_bytes, int* short_segment, int64_t* available,
                           cudaStream_t stream) {
  *short_segment = -1;
  *available = 0;
  if (num_tensors == 0) return cudaSuccess;
  const int64_t num_tiles = total_tiles(numels, num_tensors);
  radix::Workspace space;
  const size_t candidates = candidate_bytes(type, numels, num_tensors, num_segments);
  if (radix::layout_workspace(workspace, num_tensors, num_segments, num_tiles, 1, candidates,
                              sizeof(bool*) * num_tensors, &space) > workspace_bytes) {
    return cudaErrorInvalidValue;
  }
  // Host images of the tables, copied in one go (pageable copies return once the source is read).
  std::vector<TensorEntry> entries(num_tensors);
  std::vector<SegmentState> states(num_segments);
  std::vector<int64_t> numel_per_segment(num_segments, 0);
  int64_t tile = 0;
  for (int t = 0; t < num_tensors; ++t) {
    const int s = segment_of_tensor[t];
    entries[t] = TensorEntry{scores[t], nullptr, numels[t], tile, s};
    if (t == 0 || segment_of_tensor[t - 1] != s) states[s].first_tile = tile;
    numel_per_segment[s] += numels[t];
    tile += radix::tiles_of(numels[t]);
  }
  for (int s = 0; s < num_segments; ++s) {
    states[s].k = k_per_segment[s];
    states[s].select_none = k_per_segment[s] == 0;
  }
  cudaError_t error = cudaMemcpyAsync(space.tensors, entries.data(), sizeof(TensorEntry) * num_tensors,
                                      cudaMemcpyHostToDevice, stream);
  if (error == cudaSuccess) {
    error = cudaMemcpyAsync(space.states, states.data(), sizeof(SegmentState) * num_segments,
                            cudaMemcpyHostToDevice, stream);
  }
  if (error == cudaSuccess) {
    error = cudaMemcpyAsync(space.extra, masks, sizeof(bool*) * num_tensors, cudaMemcpyHostToDevice, stream);
  }
  if (error == cudaSuccess) {
    error = cudaMemsetAsync(space.hist, 0, sizeof(radix::u64) * radix::kBins * num_segments, stream);
  }
  if (error != cudaSuccess) return error;
  const radix::SelectTable table{space.tensors,     num_tensors,      num_tiles,
                                 space.states,      space.hist,       space.tie_counts,
                                 space.tie_offsets, false,            space.candidates,
                                 candidates / radix::key_bytes(type)};
  return radix::dispatch_float(
      type, TopkBody{table, space, static_cast<bool* const*>(space.extra), num_segments,
                     short_segment, available, numel_per_segment.data(), stream});
}

}  // namespace sparsekern::cuda
