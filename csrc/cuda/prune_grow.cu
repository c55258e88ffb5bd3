// prune_grow on CUDA: two radix selections and one fused finishing pass, no host synchronization.
//   1. keep: the (active - n) best active entries by prune_score; written into new_mask.
//   2. grow: the n best entries outside the kept set by grow_score; its mask pass also writes the
//      final mask and zeroes weight and optimizer state in place, so no extra pass is needed.
// Torch-free; the torch glue is prune_grow_cuda.cpp. Pass structure and cost: README.md here.
#include <vector>

#include "cuda/radix_select.cuh"
#include "cuda/radix_select.h"

namespace sparsekern::cuda {
namespace {

using radix::SegmentState;
using radix::TensorEntry;

struct StateTensor {
  void* data;
  int bytes;
};

__device__ __forceinline__ void write_zero(void* data, int bytes, int64_t i) {
  // All-zero bits are +0.0 in every IEEE format.
  switch (bytes) {
    case 2: static_cast<uint16_t*>(data)[i] = 0; break;
    case 4: static_cast<uint32_t*>(data)[i] = 0; break;
    default: static_cast<uint64_t*>(data)[i] = 0; break;
  }
}

struct WriteKept {
  bool* kept;
  __device__ void operator()(int, int64_t i, bool selected) const { kept[i] = selected; }
};

// new = kept | grown; weight 0 off new and at newly grown entries; state 0 at newly grown entries.
// `mask` (the old mask) is read only; new_mask held `kept` and is overwritten entry by entry by
// the same thread that read it.
struct Finish {
  const bool* mask;
  bool* new_mask;
  void* weight;
  int weight_bytes;
  const StateTensor* state;
  int num_state;
  __device__ void operator()(int, int64_t i, bool grown) const {
    const bool kept = new_mask[i];
    const bool now = kept || grown;
    const bool newly_grown = grown && !mask[i];
    new_mask[i] = now;
    if (!now || newly_grown) write_zero(weight, weight_bytes, i);
    if (newly_grown) {
      for (int s = 0; s < num_state; ++s) write_zero(state[s].data, state[s].bytes, i);
    }
  }
};

struct PruneGrowBody {
  radix::SelectTable keep;
  radix::SelectTable grow;
  const radix::Workspace& workspace;
  Finish finish;
  cudaStream_t stream;

  template <typename Bits, Bits kInfBits>
  cudaError_t operator()() const {
    const int last = radix::num_passes<Bits>();
    cudaError_t error = radix::run_passes<Bits, kInfBits>(keep, 1, 0, last, stream);
    if (error == cudaSuccess) {
      error = radix::run_mask<Bits, kInfBits>(keep, workspace, WriteKept{finish.new_mask}, stream);
    }
    if (error == cudaSuccess) error = radix::run_passes<Bits, kInfBits>(grow, 1, 0, last, stream);
    if (error == cudaSuccess) error = radix::run_mask<Bits, kInfBits>(grow, workspace, finish, stream);
    return error;
  }
};

}  // namespace

size_t prune_grow_workspace_bytes(FloatType score_type, int64_t numel, int num_state) {
  // Two selections (keep, grow) of one tensor each, plus the table of optimizer-state tensors.
  return radix::layout_workspace(nullptr, 1, 1, radix::tiles_of(numel), 2,
                                 radix::candidate_capacity(score_type, numel, 1) * radix::key_bytes(score_type),
                                 sizeof(StateTensor) * num_state, nullptr);
}

cudaError_t prune_grow_cuda(FloatType score_type, const void* prune_score, const void* grow_score,
                            const bool* mask, int64_t numel, int64_t n, void* weight,
                            int weight_bytes, void* const* state, const int* state_bytes,
                            int num_state, bool* new_mask, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int64_t num_tiles = radix::tiles_of(numel);
  radix::Workspace space;
  const radix::u64 capacity = radix::candidate_capacity(score_type, numel, 1);
  const size_t needed = radix::layout_workspace(workspace, 1, 1, num_tiles, 2,
                                                capacity * radix::key_bytes(score_type),
                                                sizeof(StateTensor) * num_state, &space);
  if (needed > workspace_bytes) return cudaErrorInvalidValue;

  // Keep: eligible where the old mask is set; k counts the active entries left out (n), so the
  // active count is found on the device, in the first histogram pass.
  // Grow: eligible where new_mask (holding `kept` by then) is false.
  TensorEntry entries[2] = {TensorEntry{prune_score, mask, numel, 0, 0},
                            TensorEntry{grow_score, new_mask, numel, 0, 0}};
  SegmentState states[2] = {};
  states[0].k = n;
  states[0].k_is_complement = 1;
  states[1].k = n;
  states[1].select_none = n == 0;
  std::vector<StateTensor> tables(num_state);
  for (int s = 0; s < num_state; ++s) tables[s] = StateTensor{state[s], state_bytes[s]};
  auto* state_table = static_cast<StateTensor*>(space.extra);

  cudaError_t error = cudaMemcpyAsync(space.tensors, entries, sizeof(entries), cudaMemcpyHostToDevice, stream);
  if (error == cudaSuccess) {
    error = cudaMemcpyAsync(space.states, states, sizeof(states), cudaMemcpyHostToDevice, stream);
  }
  if (error == cudaSuccess && num_state > 0) {
    error = cudaMemcpyAsync(state_table, tables.data(), sizeof(StateTensor) * num_state, cudaMemcpyHostToDevice, stream);
  }
  if (error == cudaSuccess) {
    error = cudaMemsetAsync(space.hist, 0, sizeof(radix::u64) * radix::kBins, stream);
  }
  if (error != cudaSuccess) return error;
  const radix::SelectTable keep{space.tensors,     1,    num_tiles,        space.states,
                                space.hist,        space.tie_counts, space.tie_offsets,
                                false,             space.candidates, capacity};
  const radix::SelectTable grow{space.tensors + 1, 1,    num_tiles,        space.states + 1,
                                space.hist,        space.tie_counts, space.tie_offsets,
                                true,              space.candidates, capacity};
  const Finish finish{mask, new_mask, weight, weight_bytes, state_table, num_state};
  return radix::dispatch_float(score_type, PruneGrowBody{keep, grow, space, finish, stream});
}

}  // namespace sparsekern::cuda
