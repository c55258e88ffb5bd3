// Torch-free host interface of the CUDA selection kernels (topk_mask.cu, prune_grow.cu), for the
// torch glue beside them. Pointers are device pointers to contiguous data; `stream` is where every
// launch goes. Each function returns the first CUDA error it met (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/float_type.h"

namespace sparsekern::cuda {

// Device bytes topk_mask_cuda needs as workspace for scores of `type` of these sizes split into
// `num_segments` independent selections.
size_t topk_mask_workspace_bytes(FloatType type, const int64_t* numels, int num_tensors, int num_segments);

// Selects, within each segment (a run of consecutive tensors), the k_per_segment[s] best entries
// under the selection rule (larger first, NaN never, -0.0 == +0.0, lower flat position on ties)
// and writes bool masks. segment_of_tensor is non-decreasing from 0 to num_segments - 1.
// If some segment has fewer non-NaN entries than its k, nothing is written: *short_segment is set
// to that segment and *available to its non-NaN count; otherwise *short_segment is -1.
// Synchronizes the stream once (to read the NaN counts).
cudaError_t topk_mask_cuda(FloatType type, const void* const* scores, bool* const* masks,
                           const int64_t* numels, int num_tensors, const int* segment_of_tensor,
                           const int64_t* k_per_segment, int num_segments, void* workspace,
                           size_t workspace_bytes, int* short_segment, int64_t* available,
                           cudaStream_t stream);

// Device bytes prune_grow_cuda needs as workspace for scores of `score_type`, a weight of `numel`
// entries and `num_state` optimizer-state tensors.
size_t prune_grow_workspace_bytes(FloatType score_type, int64_t numel, int num_state);

// One RigL/SET update (the contract of sparsekern.ops.prune_grow): keeps the (active - n) best
// active entries by prune_score, grows the n best of the others by grow_score, writes the new
// mask, and zeroes `weight` off the new mask and at newly grown positions and each state tensor at
// newly grown positions. Element sizes (2, 4 or 8 bytes) say how wide weight and state entries
// are: zeroing writes all-zero bits, which is 0.0 in every IEEE format. No host synchronization.
cudaError_t prune_grow_cuda(FloatType score_type, const void* prune_score, const void* grow_score,
                            const bool* mask, int64_t numel, int64_t n, void* weight,
                            int weight_bytes, void* const* state, const int* state_bytes,
                            int num_state, bool* new_mask, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream);

}  // namespace sparsekern::cuda
