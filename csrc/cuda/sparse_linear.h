// Torch-free host interface of the CUDA sparse_linear kernel (sparse_linear.cu).
// Packed layout (sparsekern.ops.packing.PackedWeight): bit j of bitmap[r, w] marks column 32*w + j
// of row r; `values` (nnz entries) holds the marked entries row by row in column order;
// chunk_offsets[r, c] is the index in `values` of row r's first entry in columns [1024*c, 1024*(c+1)).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/float_type.h"

namespace sparsekern::cuda {

// Bytes of device workspace that sparse_linear_cuda needs for these sizes (0: pass nullptr).
size_t sparse_linear_workspace_bytes(FloatType type, int64_t out_features, int64_t in_features, int64_t rows);

// y[b, r] = sum over marked columns c of row r: values(r, c) * x[b, c] (+ bias[r]), for b < rows,
// accumulated in float (double for float64) in a fixed order. x (rows, in_features) and
// y (rows, out_features) are contiguous; x, values, bias and y are of `type`; bias may be null.
// rows, out_features and in_features must be positive (the caller handles empty products).
// The kernel checks the layout where it reads it and stops with a device-side assertion if the
// bitmap, chunk_offsets and nnz disagree, so that it never reads out of bounds.
cudaError_t sparse_linear_cuda(FloatType type, const int32_t* bitmap, const void* values, int64_t nnz,
                               const int64_t* chunk_offsets, const void* x, const void* bias, void* y,
                               void* workspace, int64_t out_features, int64_t in_features, int64_t rows,
                               cudaStream_t stream);

}  // namespace sparsekern::cuda
