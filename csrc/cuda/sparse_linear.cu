// sparse_linear on CUDA: y = x @ W.T for a bitmap-packed W at small batch (GEMV-like), where
// the time is the bytes of W read: 1 bit per entry plus the kept values, against 2 bytes per entry
// for a dense fp16/bf16 W. Torch-free; the torch glue is sparse_linear_cuda.cpp.
//
// One warp takes one (row, 1024-column chunk): each lane reads one 32-bit bitmap word, a warp
// scan of popcounts gives each lane the index of its first value (from the chunk's offset), and the
// lane walks its set bits, multiplying values with the matching entries of x (read in place: x is
// small and stays in L1/L2, and no transposing launch is needed). Warp sums meet in shared memory
// per row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/sparse_linear.h"

namespace sparsekern::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerBlock = 4;
constexpr int kWordsPerChunk = 32;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
__device__ __forceinline__ double from_acc_double(double v) { return v; }

template <typename T, typename Acc>
__device__ __forceinline__ T store_value(Acc v) {
  if constexpr (sizeof(Acc) == 8) return from_acc_double(v); else return from_acc<T>(v);
}

// kBatch: batch entries per block (a power of two up to 16); blockIdx.y walks batch tiles.
template <typename T, typename Acc, int kBatch>
__global__ void __launch_bounds__(kWarps * 32)
sparse_linear_kernel(const uint32_t* __restrict__ bitmap, const T* __restrict__ values,
                     const int64_t* __restrict__ chunk_offsets, const T* __restrict__ x,
                     const T* __restrict__ bias, T* __restrict__ y, int64_t out_features,
                     int64_t in_features, int64_t words, int64_t chunks, int64_t rows) {
  __shared__ Acc partial[kRowsPerBlock][kBatch];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int t = threadIdx.x; t < kRowsPerBlock * kBatch; t += blockDim.x) partial[t / kBatch][t % kBatch] = 0;
  __syncthreads();
  const int64_t first_row = int64_t(blockIdx.x) * kRowsPerBlock;
  const int64_t b0 = int64_t(blockIdx.y) * kBatch;
  const int batch = rows - b0 < kBatch ? int(rows - b0) : kBatch;
  for (int64_t item = warp; item < kRowsPerBlock * chunks; item += kWarps) {
    const int local_row = int(item / chunks);
    const int64_t row = first_row + local_row, chunk = item % chunks;
    if (row >= out_features) break;  // items grow with the row; warp-uniform
    const int64_t word = chunk * kWordsPerChunk + lane;
    uint32_t bits = word < words ? bitmap[row * words + word] : 0u;
    // Exclusive prefix of popcounts across the warp: this lane's first value in the chunk.
    const int count = __popc(bits);
    int before = count;
#pragma unroll
    for (int shift = 1; shift < 32; shift <<= 1) {
      const int other = __shfl_up_sync(0xffffffffu, before, shift);
      if (lane >= shift) before += other;
    }
    int64_t index = chunk_offsets[row * chunks + chunk] + before - count;
    Acc acc[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) acc[b] = 0;
    while (bits != 0u) {
      const int bit = __ffs(bits) - 1;
      bits &= bits - 1u;
      const Acc v = to_acc(values[index++]);
      const T* x_column = x + b0 * in_features + word * 32 + bit;
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (b < batch) acc[b] += v * to_acc(x_column[b * in_features]);
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
#pragma unroll
      for (int shift = 16; shift > 0; shift >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], shift);
    }
    if (lane == 0) {
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (b < batch) atomicAdd(&partial[local_row][b], acc[b]);
      }
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < kRowsPerBlock * batch; t += blockDim.x) {
    const int local_row = t / batch, b = t % batch;
    const int64_t row = first_row + local_row;
    if (row >= out_features) continue;
    Acc sum = partial[local_row][b];
    if (bias != nullptr) sum += to_acc(bias[row]);
    y[(b0 + b) * out_features + row] = store_value<T, Acc>(sum);
  }
}

template <typename T, typename Acc, int kBatch>
cudaError_t launch(const int32_t* bitmap, const void* values, const int64_t* chunk_offsets,
                   const void* x, const void* bias, void* y, int64_t out_features,
                   int64_t in_features, int64_t rows, cudaStream_t stream) {
  const int64_t words = (in_features + 31) / 32;
  const int64_t chunks = (words + kWordsPerChunk - 1) / kWordsPerChunk;
  const dim3 grid(unsigned((out_features + kRowsPerBlock - 1) / kRowsPerBlock),
                  unsigned((rows + kBatch - 1) / kBatch));
  sparse_linear_kernel<T, Acc, kBatch><<<grid, kWarps * 32, 0, stream>>>(
      reinterpret_cast<const uint32_t*>(bitmap), static_cast<const T*>(values), chunk_offsets,
      static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(y), out_features,
      in_features, words, chunks, rows);
  return cudaGetLastError();
}

// The batch tile: the smallest power of two covering `rows`, at most 16.
template <typename T, typename Acc>
cudaError_t launch_for_rows(const int32_t* bitmap, const void* values, const int64_t* chunk_offsets,
                            const void* x, const void* bias, void* y, int64_t out_features,
                            int64_t in_features, int64_t rows, cudaStream_t stream) {
  if (rows <= 1) return launch<T, Acc, 1>(bitmap, values, chunk_offsets, x, bias, y, out_features, in_features, rows, stream);
  if (rows <= 2) return launch<T, Acc, 2>(bitmap, values, chunk_offsets, x, bias, y, out_features, in_features, rows, stream);
  if (rows <= 4) return launch<T, Acc, 4>(bitmap, values, chunk_offsets, x, bias, y, out_features, in_features, rows, stream);
  if (rows <= 8) return launch<T, Acc, 8>(bitmap, values, chunk_offsets, x, bias, y, out_features, in_features, rows, stream);
  return launch<T, Acc, 16>(bitmap, values, chunk_offsets, x, bias, y, out_features, in_features, rows, stream);
}

}  // namespace

cudaError_t sparse_linear_cuda(FloatType type, const int32_t* bitmap, const void* values,
                               const int64_t* chunk_offsets, const void* x, const void* bias,
                               void* y, int64_t out_features, int64_t in_features, int64_t rows,
                               cudaStream_t stream) {
  if (rows == 0 || out_features == 0) return cudaSuccess;
  switch (type) {
    case FloatType::kFloat16:
      return launch_for_rows<__half, float>(bitmap, values, chunk_offsets, x, bias, y, out_features, in_features, rows, stream);
    case FloatType::kBFloat16:
      return launch_for_rows<__nv_bfloat16, float>(bitmap, values, chunk_offsets, x, bias, y, out_features, in_features, rows, stream);
    case FloatType::kFloat32:
      return launch_for_rows<float, float>(bitmap, values, chunk_offsets, x, bias, y, out_features, in_features, rows, stream);
    case FloatType::kFloat64:
      return launch_for_rows<double, double>(bitmap, values, chunk_offsets, x, bias, y, out_features, in_features, rows, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sparsekern::cuda
