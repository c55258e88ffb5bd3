// topk_mask on CUDA: one radix select per segment over a list of tensors, all segments in the
// same launches (global selection: one segment; per-tensor variant: one segment per tensor).
// Torch-free; the torch glue is topk_mask_cuda.cpp. Pass structure and cost: README.md here. The
// device passes are in topk_mask_body.cuh, compiled one float type per file (topk_mask_<type>.cu).
#include <vector>

#include "cuda/radix_select.cuh"
#include "cuda/radix_select.h"
#include "cuda/topk_mask_body.cuh"

namespace sparsekern::cuda {
namespace {

using radix::HostTable;
using radix::SegmentState;
using radix::TensorEntry;
using topk_mask_detail::TopkBody;

struct Tables {
  HostTable host;
  size_t entries = 0, states = 0, strides = 0, masks = 0;
  int64_t num_tiles = 0;
  std::vector<int64_t> numel_per_segment;
};

Tables build_tables(const TensorRef* scores, bool* const* masks, const int64_t* numels, int num_tensors,
                    const int* segment_of_tensor, const int64_t* k_per_segment, int num_segments,
                    const Strides* strides, int num_strides) {
  Tables tables;
  std::vector<TensorEntry> entries(num_tensors);
  std::vector<SegmentState> states(num_segments, SegmentState{});
  tables.numel_per_segment.assign(num_segments, 0);
  int64_t tile = 0;
  for (int t = 0; t < num_tensors; ++t) {
    const int s = segment_of_tensor[t];
    const int vectorized = scores[t].strides < 0 && reinterpret_cast<uintptr_t>(scores[t].data) % 16 == 0;
    entries[t] = TensorEntry{scores[t], TensorRef{nullptr, -1}, numels[t], tile, s, vectorized};
    if (t == 0 || segment_of_tensor[t - 1] != s) states[s].first_tile = tile;
    tables.numel_per_segment[s] += numels[t];
    tile += radix::tiles_of(numels[t]);
  }
  for (int s = 0; s < num_segments; ++s) {
    states[s].k = k_per_segment[s];
    states[s].select_none = k_per_segment[s] == 0;
  }
  tables.num_tiles = tile;
  tables.entries = tables.host.append(entries.data(), entries.size());
  tables.states = tables.host.append(states.data(), states.size());
  tables.strides = tables.host.append(strides, num_strides);
  tables.masks = tables.host.append(masks, num_tensors);
  return tables;
}

radix::u64 capacity_of(FloatType type, const Tables& tables, int num_segments) {
  int64_t total = 0;
  for (int64_t numel : tables.numel_per_segment) total += numel;
  return radix::candidate_capacity(type, total, num_segments);
}

size_t workspace_bytes(FloatType type, const Tables& tables, int num_segments) {
  return radix::layout_workspace(nullptr, tables.host.size(), num_segments, tables.num_tiles,
                                 capacity_of(type, tables, num_segments) * radix::key_bytes(type), nullptr);
}

}  // namespace

size_t topk_mask_workspace_bytes(FloatType type, const int64_t* numels, int num_tensors, int num_segments,
                                 int num_strides) {
  // The tables' size does not depend on their contents: measure with placeholders.
  std::vector<TensorRef> scores(num_tensors, TensorRef{nullptr, -1});
  std::vector<bool*> masks(num_tensors, nullptr);
  std::vector<int> segment_of_tensor(num_tensors);
  for (int t = 0; t < num_tensors; ++t) segment_of_tensor[t] = num_segments == 1 ? 0 : t;
  std::vector<int64_t> k(num_segments, 0);
  std::vector<Strides> strides(num_strides);
  const Tables tables = build_tables(scores.data(), masks.data(), numels, num_tensors, segment_of_tensor.data(),
                                     k.data(), num_segments, strides.data(), num_strides);
  return workspace_bytes(type, tables, num_segments);
}

size_t topk_mask_pinned_bytes(int num_segments) { return sizeof(SegmentState) * num_segments; }

cudaError_t topk_mask_cuda(FloatType type, const TensorRef* scores, bool* const* masks, const int64_t* numels,
                           int num_tensors, const int* segment_of_tensor, const int64_t* k_per_segment,
                           int num_segments, const Strides* strides, int num_strides, void* workspace,
                           size_t workspace_bytes_given, void* pinned, int* short_segment, int64_t* available,
                           cudaStream_t stream) {
  *short_segment = -1;
  *available = 0;
  if (num_tensors == 0) return cudaSuccess;
  const Tables tables = build_tables(scores, masks, numels, num_tensors, segment_of_tensor, k_per_segment,
                                     num_segments, strides, num_strides);
  if (workspace_bytes(type, tables, num_segments) > workspace_bytes_given) return cudaErrorInvalidValue;
  const radix::u64 capacity = capacity_of(type, tables, num_segments);
  radix::Workspace space;
  radix::layout_workspace(workspace, tables.host.size(), num_segments, tables.num_tiles,
                          capacity * radix::key_bytes(type), &space);
  cudaError_t error = radix::upload(space.table, tables.host.data(), tables.host.size(), stream);
  if (error == cudaSuccess) {
    error = cudaMemsetAsync(space.hist, 0, sizeof(radix::u64) * radix::kBins * num_segments, stream);
  }
  if (error != cudaSuccess) return error;
  auto* states = HostTable::at<SegmentState>(space.table, tables.states);
  const radix::SelectTable table{HostTable::at<TensorEntry>(space.table, tables.entries),
                                 num_tensors,
                                 tables.num_tiles,
                                 states,
                                 HostTable::at<Strides>(space.table, tables.strides),
                                 space.hist,
                                 space.tie_counts,
                                 space.tie_offsets,
                                 /*invert_eligible=*/0,
                                 /*absolute=*/0,
                                 space.candidates,
                                 capacity};
  return radix::dispatch_float(
      type, TopkBody{table, space, HostTable::at<bool*>(space.table, tables.masks), num_segments,
                     static_cast<SegmentState*>(pinned), short_segment, available,
                     tables.numel_per_segment.data(), stream});
}

}  // namespace sparsekern::cuda
