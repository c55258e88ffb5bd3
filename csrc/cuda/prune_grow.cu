// prune_grow on CUDA for a list of layers: two radix selections over every layer at once and a fused
// finishing pass, a fixed number of launches whatever the number of layers, no host synchronization.
//   1. keep: per segment, the (active - n) best active entries by prune score; written into the new
//      masks. The active count is found on the device, in the first histogram pass.
//   2. grow: per segment, the n best entries outside the kept set by grow score; its mask pass also
//      writes the final masks and zeroes weights, optimizer state and masked tensors in place.
// Every table (tensors, segments, layers, targets, strides) is uploaded through kernel parameters.
// Torch-free; the torch glue is prune_grow_cuda.cpp. Pass structure and cost: README.md here. The
// device passes are in prune_grow_body.cuh, compiled one float type per file (prune_grow_<type>.cu).
#include <vector>

#include "cuda/prune_grow_body.cuh"
#include "cuda/radix_select.cuh"
#include "cuda/radix_select.h"

namespace sparsekern::cuda {
namespace {

using radix::HostTable;
using radix::SegmentState;
using radix::TensorEntry;
using prune_grow_detail::Finish;
using prune_grow_detail::LayerOutputs;
using prune_grow_detail::PruneGrowBody;
using prune_grow_detail::WriteKept;

// The uploaded tables of one call, and their offsets in the upload.
struct Tables {
  HostTable host;
  size_t entries = 0, states = 0, strides = 0, layers = 0, targets = 0;
  int64_t num_tiles = 0;
  int num_segments = 0;
};

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

Tables build_tables(const PruneGrowLayer* layers, int num_layers, const int64_t* n, bool global_scope,
                    const ZeroTarget* targets, int num_targets, const Strides* strides, int num_strides) {
  Tables tables;
  tables.num_segments = global_scope ? 1 : num_layers;
  // Keep entries (scores: prune, flags: the old mask), then grow entries (scores: grow, flags: the
  // new mask holding `kept`, selected where zero), over the same tiles.
  std::vector<TensorEntry> entries(2 * num_layers);
  std::vector<SegmentState> states(2 * tables.num_segments, SegmentState{});
  std::vector<LayerOutputs> outputs(num_layers);
  int64_t tile = 0;
  int target = 0;
  for (int l = 0; l < num_layers; ++l) {
    const PruneGrowLayer& layer = layers[l];
    const int segment = global_scope ? 0 : l;
    if (l == 0 || !global_scope) {
      states[segment].first_tile = tile;
      states[tables.num_segments + segment].first_tile = tile;
    }
    const int vector_keep = layer.prune_score.strides < 0 && layer.mask.strides < 0 &&
                            aligned16(layer.prune_score.data) && aligned16(layer.mask.data);
    const int vector_grow = layer.grow_score.strides < 0 && aligned16(layer.grow_score.data) &&
                            aligned16(layer.new_mask);
    entries[l] = TensorEntry{layer.prune_score, layer.mask, layer.numel, tile, segment, vector_keep};
    entries[num_layers + l] = TensorEntry{layer.grow_score, TensorRef{layer.new_mask, -1}, layer.numel, tile,
                                          segment, vector_grow};
    const int first = target;
    while (target < num_targets && targets[target].layer == l) ++target;
    outputs[l] = LayerOutputs{layer.mask, reinterpret_cast<uint8_t*>(layer.new_mask), first, target - first};
    tile += radix::tiles_of(layer.numel);
  }
  for (int s = 0; s < tables.num_segments; ++s) {
    SegmentState& keep = states[s];
    keep.k = n[s];
    keep.k_is_complement = 1;
    SegmentState& grow = states[tables.num_segments + s];
    grow.k = n[s];
    grow.select_none = n[s] == 0;
  }
  tables.num_tiles = tile;
  tables.entries = tables.host.append(entries.data(), entries.size());
  tables.states = tables.host.append(states.data(), states.size());
  tables.strides = tables.host.append(strides, num_strides);
  tables.layers = tables.host.append(outputs.data(), outputs.size());
  tables.targets = tables.host.append(targets, num_targets);
  return tables;
}

size_t workspace_bytes(FloatType score_type, const Tables& tables, int64_t total_numel) {
  const radix::u64 capacity = radix::candidate_capacity(score_type, total_numel, tables.num_segments);
  return radix::layout_workspace(nullptr, tables.host.size(), tables.num_segments, tables.num_tiles,
                                 capacity * radix::key_bytes(score_type), nullptr);
}

int64_t total_numel(const PruneGrowLayer* layers, int num_layers) {
  int64_t total = 0;
  for (int l = 0; l < num_layers; ++l) total += layers[l].numel;
  return total;
}

}  // namespace

size_t prune_grow_workspace_bytes(FloatType score_type, const PruneGrowLayer* layers, int num_layers,
                                  bool global_scope, int num_targets, int num_strides) {
  // The tables' size does not depend on their contents: measure with placeholders.
  std::vector<int64_t> n(global_scope ? 1 : num_layers, 0);
  std::vector<ZeroTarget> targets(num_targets, ZeroTarget{TensorRef{nullptr, -1}, 4, num_layers, 0});
  std::vector<Strides> strides(num_strides);
  const Tables tables = build_tables(layers, num_layers, n.data(), global_scope, targets.data(), num_targets,
                                     strides.data(), num_strides);
  return workspace_bytes(score_type, tables, total_numel(layers, num_layers));
}

cudaError_t prune_grow_cuda(FloatType score_type, const PruneGrowLayer* layers, int num_layers, const int64_t* n,
                            bool global_scope, const ZeroTarget* targets, int num_targets, const Strides* strides,
                            int num_strides, bool prune_abs, bool grow_abs, void* workspace,
                            size_t workspace_bytes_given, cudaStream_t stream) {
  if (num_layers == 0) return cudaSuccess;
  const Tables tables = build_tables(layers, num_layers, n, global_scope, targets, num_targets, strides,
                                     num_strides);
  const int64_t total = total_numel(layers, num_layers);
  if (tables.num_tiles == 0) return cudaSuccess;
  if (workspace_bytes(score_type, tables, total) > workspace_bytes_given) return cudaErrorInvalidValue;
  radix::Workspace space;
  const radix::u64 capacity = radix::candidate_capacity(score_type, total, tables.num_segments);
  radix::layout_workspace(workspace, tables.host.size(), tables.num_segments, tables.num_tiles,
                          capacity * radix::key_bytes(score_type), &space);
  cudaError_t error = radix::upload(space.table, tables.host.data(), tables.host.size(), stream);
  if (error == cudaSuccess) {
    error = cudaMemsetAsync(space.hist, 0, sizeof(radix::u64) * radix::kBins * tables.num_segments, stream);
  }
  if (error != cudaSuccess) return error;
  auto* entries = HostTable::at<TensorEntry>(space.table, tables.entries);
  auto* states = HostTable::at<SegmentState>(space.table, tables.states);
  const auto* device_strides = HostTable::at<Strides>(space.table, tables.strides);
  const auto* outputs = HostTable::at<LayerOutputs>(space.table, tables.layers);
  const auto* device_targets = HostTable::at<ZeroTarget>(space.table, tables.targets);
  const radix::SelectTable keep{entries,
                                num_layers,
                                tables.num_tiles,
                                states,
                                device_strides,
                                space.hist,
                                space.tie_counts,
                                space.tie_offsets,
                                /*invert_eligible=*/0,
                                prune_abs,
                                space.candidates,
                                capacity};
  const radix::SelectTable grow{entries + num_layers,
                                num_layers,
                                tables.num_tiles,
                                states + tables.num_segments,
                                device_strides,
                                space.hist,
                                space.tie_counts,
                                space.tie_offsets,
                                /*invert_eligible=*/1,
                                grow_abs,
                                space.candidates,
                                capacity};
  return radix::dispatch_float(score_type,
                               PruneGrowBody{keep, grow, tables.num_segments, space, WriteKept{outputs},
                                             Finish{outputs, device_targets, device_strides}, stream});
}

}  // namespace sparsekern::cuda
