// Torch-free host interface of the CUDA selection kernels (topk_mask.cu, prune_grow.cu), for the
// torch glue beside them. Pointers are device pointers; `stream` is where every launch goes. Each
// function returns the first CUDA error it met (cudaSuccess otherwise).
//
// Tensors of any strides are read and written in place: a TensorRef names a tensor's data and,
// when it is not contiguous, its sizes and strides (an entry of the call's `strides` list), and
// entries are addressed in flat (row-major) order through them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/float_type.h"

namespace sparsekern::cuda {

constexpr int kMaxDims = 8;

// Sizes and strides (in entries) of a non-contiguous tensor of under 2^32 entries, dimensions of
// size 1 left out.
constexpr int64_t kMaxStridedNumel = int64_t(1) << 32;
struct Strides {
  int dims;
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];
};

struct TensorRef {
  void* data;
  int strides;  // index into the call's strides list, or -1 for a contiguous tensor
};

// Device bytes topk_mask_cuda needs as workspace, and host bytes of pinned memory for the counts it
// reads back.
size_t topk_mask_workspace_bytes(FloatType type, const int64_t* numels, int num_tensors, int num_segments,
                                 int num_strides);
size_t topk_mask_pinned_bytes(int num_segments);

// Selects, within each segment (a run of consecutive tensors), the k_per_segment[s] best entries
// under the selection rule (larger first, NaN never, -0.0 == +0.0, lower flat position on ties)
// and writes bool masks (contiguous). segment_of_tensor is non-decreasing from 0 to num_segments - 1.
// If some segment has fewer non-NaN entries than its k, nothing is written: *short_segment is set
// to that segment and *available to its non-NaN count; otherwise *short_segment is -1.
// Synchronizes the stream once, to read the NaN counts through `pinned` (host memory of
// topk_mask_pinned_bytes) before any mask is written.
cudaError_t topk_mask_cuda(FloatType type, const TensorRef* scores, bool* const* masks, const int64_t* numels,
                           int num_tensors, const int* segment_of_tensor, const int64_t* k_per_segment,
                           int num_segments, const Strides* strides, int num_strides, void* workspace,
                           size_t workspace_bytes, void* pinned, int* short_segment, int64_t* available,
                           cudaStream_t stream);

// One layer of a prune_grow call.
struct PruneGrowLayer {
  TensorRef mask;         // the current mask (bytes; any non-zero byte is set), read only
  TensorRef prune_score;  // of the call's score type
  TensorRef grow_score;
  bool* new_mask;         // contiguous output
  int64_t numel;
};

// A tensor prune_grow zeroes: a weight or state tensor (like_weight: 0 off the new mask and at
// newly grown entries) or a masked one (0 off the new mask). `bytes` is its element size: zeroing
// writes all-zero bits, 0.0 in every IEEE format.
struct ZeroTarget {
  TensorRef ref;
  int bytes;
  int layer;
  int like_weight;
};

// Device bytes prune_grow_cuda needs as workspace.
size_t prune_grow_workspace_bytes(FloatType score_type, const PruneGrowLayer* layers, int num_layers,
                                  bool global_scope, int num_targets, int num_strides);

// The RigL/SET update of every layer (the contract of sparsekern.ops.prune_grow): per segment (each
// layer, or the whole list when global_scope) keeps the (active - n[s]) best active entries by
// prune score, grows the n[s] best of the rest by grow score (|score| with prune_abs / grow_abs),
// writes the new masks and zeroes the targets. The active counts are found on the device, so
// nothing is read back: no host synchronization, and the launches (a fixed number, whatever the
// number of layers) can be captured in a CUDA graph. Targets are sorted by layer.
cudaError_t prune_grow_cuda(FloatType score_type, const PruneGrowLayer* layers, int num_layers, const int64_t* n,
                            bool global_scope, const ZeroTarget* targets, int num_targets, const Strides* strides,
                            int num_strides, bool prune_abs, bool grow_abs, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream);

}  // namespace sparsekern::cuda
