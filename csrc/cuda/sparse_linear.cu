// sparse_linear on CUDA: y = x @ W.T for a bitmap-packed W at small batch (GEMV-like), where the
// time is the bytes of W read: 1 bit per entry plus the kept values, against 2 bytes per entry for a
// dense fp16/bf16 W. Torch-free; the torch glue is sparse_linear_cuda.cpp.
//
// A block owns a group of output rows, one slab of whole 1024-column chunks and one tile of at
// most 16 batch rows. It first stages x[tile, slab] in shared memory, one column's batch entries side
// by side, so that each kept entry costs one or two vector shared loads instead of a 2-byte global
// gather per batch row. Then each warp walks its rows chunk
// by chunk: one lane per bitmap word, a warp scan of popcounts places every set bit in a per-warp
// list of columns, and the lanes take the chunk's kept entries in turn (entry i to lane i % 32), so
// the value loads are coalesced and every lane does the same work whatever the bit counts. A lane
// keeps one partial sum per batch row; at the end of a row one butterfly of shuffles adds them
// across the warp. No atomics: a row's sum has one fixed order, so results are deterministic. When
// x's slab cannot hold every column, blocks of several slabs write float partial sums, and a second
// kernel adds them in slab order (plus the bias).
//
// The packed layout is checked where it is read, so that no inconsistent input reads out of bounds
// (sparsekern.ops.PackedWeight checks it once with clear errors; the op can be called directly):
// each (row, chunk) checks that its values range [chunk_offsets[i], chunk_offsets[i + 1]) (nnz for
// the last) lies in values and holds exactly the chunk's set bits, chunk_offsets[0] == 0, and that
// no bit marks a column past in_features. Together these are the whole layout. A failure is a
// device-side assertion, as torch's own index kernels report a bad index: refusing on the host would
// cost a synchronization per call.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "cuda/sparse_linear.h"

// The device-side assertion that assert() calls, declared as glibc does (<cassert> hides it under
// NDEBUG, and this check must stay in release builds).
extern "C" __host__ __device__ void __assert_fail(const char* assertion, const char* file, unsigned int line,
                                                 const char* function) noexcept __attribute__((__noreturn__));

namespace sparsekern::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunkWords = 32;
constexpr int kChunkColumns = kChunkWords * 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Values each lane loads per step of a chunk's kept entries (loads in flight together).
constexpr int kValuesPerLane = 4;
// Shared memory for the staged x slab: at least one chunk; more slabs (and a second kernel) when
// in_features needs more. Smaller slabs leave room for more blocks per SM.
constexpr int64_t kSlabBytes = 32 * 1024;
// Batch rows per launch when partial sums are kept (they take splits * rows * out floats).
constexpr int64_t kRowsPerPassWithSplits = 256;
// Devices for which a launcher remembers its shared-memory opt-in (others ask every call).
constexpr int kDevicesRemembered = 64;

// Output rows per block: more for larger batch tiles, whose staged x costs more to fill, so that
// every block reuses it over enough rows (x is read from L2 once per block).
__host__ __device__ constexpr int rows_per_block(int batch_tile) {
  return kWarps * (batch_tile <= 1 ? 2 : batch_tile == 2 ? 4 : batch_tile == 4 ? 8 : 16);
}

// Bytes of one staged x entry: fp16/bf16 x stays as it is, since every kept entry reads a column of
// the batch tile from shared memory and at 8-16 rows that read is the bound (as float it would cost
// twice the bytes); float32/float64 x is staged as it is too (the accumulator type).
__host__ __device__ constexpr int stage_bytes(int value_bytes, int acc_bytes) {
  return value_bytes == 2 ? 2 : acc_bytes;
}

// Elements per column of the staged x: the batch tile, padded to an odd number of 16-byte units
// once it spans one or more, so that lanes reading 16-byte pieces of random columns spread over all
// 32 banks (with an even number every column starts in the same half of the banks).
__host__ __device__ constexpr int column_stride(int batch_tile, int entry_bytes) {
  const int bytes = batch_tile * entry_bytes;
  if (bytes < 16) return batch_tile;
  const int units = (bytes + 15) / 16;
  return (units % 2 == 0 ? units + 1 : units) * 16 / entry_bytes;
}

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return v; }

template <typename Stage, typename T, typename Acc>
__device__ __forceinline__ Stage to_stage(T v) {
  if constexpr (std::is_same_v<Stage, T>) return v; else return to_acc(v);
}
template <typename Stage> __device__ __forceinline__ Stage zero_stage() { return Stage(0); }
template <> __device__ __forceinline__ __half zero_stage<__half>() { return __ushort_as_half(0); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_stage<__nv_bfloat16>() { return __ushort_as_bfloat16(0); }

__device__ __forceinline__ float2 pair_to_acc(uint32_t pair, __half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&pair));
}
__device__ __forceinline__ float2 pair_to_acc(uint32_t pair, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pair));
}

// The kBatch staged entries of one column as Acc (16-byte loads where the column spans them).
template <typename Stage, typename Acc, int kBatch>
__device__ __forceinline__ void load_column(const Stage* p, Acc (&v)[kBatch]) {
  constexpr int kBytes = kBatch * int(sizeof(Stage));
  if constexpr (sizeof(Stage) == 2 && kBatch == 1) {
    v[0] = to_acc(p[0]);
  } else if constexpr (sizeof(Stage) == 2) {  // fp16/bf16 pairs, in one 4-, 8- or 16-byte load at a time
    constexpr int kPairs = kBytes >= 16 ? 4 : kBytes / 4;
#pragma unroll
    for (int i = 0; i < kBatch / (2 * kPairs); ++i) {
      uint32_t pairs[kPairs];
      if constexpr (kPairs == 4) {
        const uint4 q = reinterpret_cast<const uint4*>(p)[i];
        pairs[0] = q.x, pairs[1] = q.y, pairs[2] = q.z, pairs[3] = q.w;
      } else if constexpr (kPairs == 2) {
        const uint2 q = reinterpret_cast<const uint2*>(p)[i];
        pairs[0] = q.x, pairs[1] = q.y;
      } else {
        pairs[0] = reinterpret_cast<const uint32_t*>(p)[i];
      }
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        const float2 f = pair_to_acc(pairs[j], Stage());
        v[2 * (kPairs * i + j)] = f.x, v[2 * (kPairs * i + j) + 1] = f.y;
      }
    }
  } else if constexpr (kBytes % 16 == 0 && sizeof(Acc) == 4) {
#pragma unroll
    for (int i = 0; i < kBatch / 4; ++i) {
      const float4 q = reinterpret_cast<const float4*>(p)[i];
      v[4 * i] = q.x, v[4 * i + 1] = q.y, v[4 * i + 2] = q.z, v[4 * i + 3] = q.w;
    }
  } else if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < kBatch / 2; ++i) {
      const double2 q = reinterpret_cast<const double2*>(p)[i];
      v[2 * i] = q.x, v[2 * i + 1] = q.y;
    }
  } else if constexpr (kBytes == 8 && sizeof(Acc) == 4) {
    const float2 q = *reinterpret_cast<const float2*>(p);
    v[0] = q.x, v[1] = q.y;
  } else {
#pragma unroll
    for (int i = 0; i < kBatch; ++i) v[i] = p[i];
  }
}

// Out of line, so that the assertion's call does not weigh on the kernel's registers.
__device__ __noinline__ void packed_weight_error() {
  __assert_fail("sparsekern::sparse_linear: bitmap, values and chunk_offsets disagree (a sparsekern.ops.PackedWeight "
                "checks them with a clear error)", __FILE__, __LINE__, __func__);
  __trap();  // in case assertions are compiled out: never go on to read by the bad layout
}

// What a warp reads first for one (row, chunk): its lane's bitmap word and the chunk's values range.
struct ChunkHead {
  uint32_t bits;
  int64_t start, end;
};

__device__ __forceinline__ ChunkHead load_head(const uint32_t* __restrict__ bitmap,
                                               const int64_t* __restrict__ chunk_offsets, int64_t nnz,
                                               int64_t row, int64_t chunk, int64_t words, int64_t chunks,
                                               int64_t items, int lane) {
  const int64_t word = chunk * kChunkWords + lane;
  const int64_t item = row * chunks + chunk;
  ChunkHead head;
  head.bits = word < words ? __ldg(bitmap + row * words + word) : 0u;
  head.start = __ldg(chunk_offsets + item);
  head.end = item + 1 < items ? __ldg(chunk_offsets + item + 1) : nnz;
  return head;
}

// One halving step of sum_across_lanes (kHalf entries kept of 2 * kHalf), then the next ones.
template <typename Acc, int kBatch, int kHalf>
__device__ __forceinline__ void halve_across_lanes(Acc (&acc)[kBatch], int lane) {
  if constexpr (kHalf >= 1) {
    constexpr int kMask = 32 * kHalf / kBatch;
    const bool upper = (lane & kMask) != 0;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const Acc give = upper ? acc[i] : acc[i + kHalf];
      const Acc keep = upper ? acc[i + kHalf] : acc[i];
      acc[i] = keep + __shfl_xor_sync(kFullMask, give, kMask);
    }
    halve_across_lanes<Acc, kBatch, kHalf / 2>(acc, lane);
  }
}

// Sums acc[b] over the warp's 32 lanes for every b; returns the sum of batch entry lane / (32 / kBatch)
// (every lane of a group of 32 / kBatch lanes holds the same one). Each halving step gives the
// partner lane the half of the entries it keeps and adds the partner's copy of the half kept here:
// kBatch - 1 + log2(32 / kBatch) shuffles instead of 5 * kBatch, in a fixed order.
template <typename Acc, int kBatch>
__device__ __forceinline__ Acc sum_across_lanes(Acc (&acc)[kBatch], int lane) {
  halve_across_lanes<Acc, kBatch, kBatch / 2>(acc, lane);
  Acc sum = acc[0];
#pragma unroll
  for (int mask = 16 / kBatch; mask >= 1; mask /= 2) sum += __shfl_xor_sync(kFullMask, sum, mask);
  return sum;
}

// x: (rows, in_features) of this pass; y: (rows, out_features). Block: (row group, slab) in
// blockIdx.x, batch tile in blockIdx.y. With splits > 1, partial[split][rows][out_features] gets
// float sums and add_splits_kernel finishes y.
template <typename T, typename Acc, int kBatch>
__global__ void __launch_bounds__(kThreads)
sparse_linear_kernel(const uint32_t* __restrict__ bitmap, const T* __restrict__ values, int64_t nnz,
                     const int64_t* __restrict__ chunk_offsets, const T* __restrict__ x,
                     const T* __restrict__ bias, T* __restrict__ y, Acc* __restrict__ partial,
                     int64_t out_features, int64_t in_features, int64_t rows, int64_t slab_chunks,
                     int64_t splits) {
  constexpr int kRows = rows_per_block(kBatch);
  using Stage = std::conditional_t<stage_bytes(sizeof(T), sizeof(Acc)) == 2, T, Acc>;
  constexpr int kStride = column_stride(kBatch, sizeof(Stage));
  extern __shared__ __align__(16) unsigned char shared[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t words = (in_features + 31) / 32, chunks = (words + kChunkWords - 1) / kChunkWords;
  const int64_t groups = (out_features + kRows - 1) / kRows;
  const int64_t group = blockIdx.x % groups, split = blockIdx.x / groups;
  const int64_t b0 = int64_t(blockIdx.y) * kBatch;
  const int batch = rows - b0 < kBatch ? int(rows - b0) : kBatch;
  const int64_t first_chunk = split * slab_chunks;
  const int64_t last_chunk = first_chunk + slab_chunks < chunks ? first_chunk + slab_chunks : chunks;
  const int64_t first_column = first_chunk * kChunkColumns;
  const int staged = int((last_chunk - first_chunk) * kChunkColumns);
  const int64_t slab_end = last_chunk * kChunkColumns < in_features ? last_chunk * kChunkColumns : in_features;
  const int present = int(slab_end - first_column);

  Stage* x_slab = reinterpret_cast<Stage*>(shared);
  uint16_t* columns = reinterpret_cast<uint16_t*>(x_slab + slab_chunks * kChunkColumns * kStride) + warp * kChunkColumns;
  // x[b0 + b, first_column + c] -> x_slab[c * kStride + b]; zero past the batch and past in_features.
#pragma unroll
  for (int b = 0; b < kBatch; ++b) {
    const T* x_row = x + (b0 + b) * in_features + first_column;
    for (int c = threadIdx.x; c < staged; c += kThreads) {
      x_slab[c * kStride + b] = b < batch && c < present ? to_stage<Stage, T, Acc>(x_row[c]) : zero_stage<Stage>();
    }
  }
  __syncthreads();

  // This warp's rows are group * kRows + warp + j * kWarps; it walks (row, chunk) steps in order and
  // loads the next step's head before working on the current one.
  const int64_t first_row = group * kRows + warp;
  const int64_t row_end = (group + 1) * kRows < out_features ? (group + 1) * kRows : out_features;
  if (first_row >= row_end) return;
  const int64_t items = out_features * chunks;
  const int spare = int(in_features % 32);
  Acc acc[kBatch];
#pragma unroll
  for (int b = 0; b < kBatch; ++b) acc[b] = Acc(0);
  int64_t row = first_row, chunk = first_chunk;
  ChunkHead next = load_head(bitmap, chunk_offsets, nnz, row, chunk, words, chunks, items, lane);
  while (true) {
    const ChunkHead head = next;
    int64_t next_row = row, next_chunk = chunk + 1;
    if (next_chunk == last_chunk) next_row += kWarps, next_chunk = first_chunk;
    if (next_row < row_end) {
      next = load_head(bitmap, chunk_offsets, nnz, next_row, next_chunk, words, chunks, items, lane);
    }

    // The layout's invariants for this chunk, before anything is read by them.
    bool ok = head.start >= 0 && head.end <= nnz && head.start <= head.end &&
              head.end - head.start <= kChunkColumns && (row * chunks + chunk != 0 || head.start == 0);
    if (spare != 0 && chunk * kChunkWords + lane == words - 1 && (head.bits >> spare) != 0u) ok = false;
    if (!__all_sync(kFullMask, ok)) packed_weight_error();
    const int count = int(head.end - head.start);
    const T* chunk_values = values + head.start;
    Acc v[kValuesPerLane];
#pragma unroll
    for (int u = 0; u < kValuesPerLane; ++u) {
      const int i = u * 32 + lane;
      v[u] = i < count ? to_acc(chunk_values[i]) : Acc(0);
    }
    // Exclusive prefix of the lanes' popcounts: where this lane's columns go in the list.
    const int own = __popc(head.bits);
    int before = own;
#pragma unroll
    for (int shift = 1; shift < 32; shift <<= 1) {
      const int other = __shfl_up_sync(kFullMask, before, shift);
      if (lane >= shift) before += other;
    }
    if (__shfl_sync(kFullMask, before, 31) != count) packed_weight_error();
    before -= own;
    for (uint32_t bits = head.bits; bits != 0u; bits &= bits - 1u) {
      columns[before++] = uint16_t(lane * 32 + __ffs(bits) - 1);
    }
    __syncwarp();
    const Stage* chunk_x = x_slab + (chunk - first_chunk) * kChunkColumns * kStride;
    for (int base = 0; base < count; base += 32 * kValuesPerLane) {
      if (base > 0) {
#pragma unroll
        for (int u = 0; u < kValuesPerLane; ++u) {
          const int i = base + u * 32 + lane;
          v[u] = i < count ? to_acc(chunk_values[i]) : Acc(0);
        }
      }
#pragma unroll
      for (int u = 0; u < kValuesPerLane; ++u) {
        const int i = base + u * 32 + lane;
        if (i < count) {
          Acc column[kBatch];
          load_column<Stage, Acc, kBatch>(chunk_x + columns[i] * kStride, column);
#pragma unroll
          for (int b = 0; b < kBatch; ++b) acc[b] += v[u] * column[b];
        }
      }
    }
    __syncwarp();  // the list is rewritten by the next chunk

    if (chunk == last_chunk - 1) {
      const Acc sum = sum_across_lanes<Acc, kBatch>(acc, lane);
      const int group_lanes = 32 / kBatch, b = lane / group_lanes;
      if (lane % group_lanes == 0 && b < batch) {
        if (splits == 1) {
          y[(b0 + b) * out_features + row] = from_acc<T>(bias != nullptr ? sum + to_acc(bias[row]) : sum);
        } else {
          partial[(split * rows + b0 + b) * out_features + row] = sum;
        }
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) acc[i] = Acc(0);
    }
    if (next_row >= row_end) break;
    row = next_row, chunk = next_chunk;
  }
}

// y = the slabs' partial sums added in slab order, plus the bias.
template <typename T, typename Acc>
__global__ void add_splits_kernel(const Acc* __restrict__ partial, const T* __restrict__ bias, T* __restrict__ y,
                                  int64_t out_features, int64_t count, int64_t splits) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    Acc sum = partial[i];
    for (int64_t s = 1; s < splits; ++s) sum += partial[s * count + i];
    y[i] = from_acc<T>(bias != nullptr ? sum + to_acc(bias[i % out_features]) : sum);
  }
}

// How one call is cut: x's slab (whole chunks) per block, the number of slabs, rows per launch.
struct Plan {
  int64_t slab_chunks, splits, rows_per_pass;
  size_t shared_bytes;
};

int batch_tile(int64_t rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : rows <= 8 ? 8 : 16; }

Plan make_plan(int tile, int value_bytes, int acc_bytes, int64_t in_features) {
  const int64_t chunks = ((in_features + 31) / 32 + kChunkWords - 1) / kChunkWords;
  const int entry_bytes = stage_bytes(value_bytes, acc_bytes);
  const int64_t chunk_bytes = int64_t(kChunkColumns) * column_stride(tile, entry_bytes) * entry_bytes;
  const int64_t fit = kSlabBytes / chunk_bytes > 1 ? kSlabBytes / chunk_bytes : 1;
  Plan plan;
  plan.splits = (chunks + fit - 1) / fit;
  plan.slab_chunks = (chunks + plan.splits - 1) / plan.splits;  // even slabs
  plan.rows_per_pass = plan.splits == 1 ? int64_t(65535) * tile : kRowsPerPassWithSplits;
  plan.shared_bytes = size_t(plan.slab_chunks * chunk_bytes) + kWarps * kChunkColumns * sizeof(uint16_t);
  return plan;
}

// The current device and the shared memory one of its blocks may opt in to.
struct SharedLimit {
  int device = 0;
  int bytes = 0;
};

// The batch tile for `rows`, halved while its plan needs more shared memory than a block may have:
// fp64 at 9-16 rows stages ~160 KB, which H100 and A100 have and sm_86/89/120 (99 KB) do not. A smaller
// tile needs no more workspace (its plan has no more slabs), so the workspace size ignores the device.
int fitting_batch_tile(int64_t rows, int value_bytes, int acc_bytes, int64_t in_features, int shared_limit) {
  int tile = batch_tile(rows);
  while (tile > 1 && make_plan(tile, value_bytes, acc_bytes, in_features).shared_bytes > size_t(shared_limit)) tile /= 2;
  return tile;
}

int acc_bytes(FloatType type) { return type == FloatType::kFloat64 ? 8 : 4; }
int value_bytes(FloatType type) {
  return type == FloatType::kFloat64 ? 8 : type == FloatType::kFloat32 ? 4 : 2;
}

template <typename T, typename Acc, int kBatch>
cudaError_t launch(const int32_t* bitmap, const void* values, int64_t nnz, const int64_t* chunk_offsets,
                   const void* x, const void* bias, void* y, void* workspace, int64_t out_features,
                   int64_t in_features, int64_t rows, const SharedLimit& shared, cudaStream_t stream) {
  const Plan plan = make_plan(kBatch, sizeof(T), sizeof(Acc), in_features);
  const auto kernel = sparse_linear_kernel<T, Acc, kBatch>;
  // More than 48 KB of dynamic shared memory needs an opt-in per kernel and device. It is made once, to
  // the device's whole limit (the kernel has no static shared memory), so every thread sets the same
  // value: two first calls at once cannot leave it below the size the other then launches with.
  static std::atomic<bool> opted_in[kDevicesRemembered] = {};
  const bool remembered = shared.device < kDevicesRemembered;
  if (plan.shared_bytes > 48 * 1024 && !(remembered && opted_in[shared.device].load())) {
    const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared.bytes);
    if (error != cudaSuccess) return error;
    if (remembered) opted_in[shared.device].store(true);
  }
  cudaError_t error = cudaSuccess;
  const int64_t blocks = (out_features + rows_per_block(kBatch) - 1) / rows_per_block(kBatch) * plan.splits;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  for (int64_t r0 = 0; r0 < rows; r0 += plan.rows_per_pass) {
    const int64_t n = rows - r0 < plan.rows_per_pass ? rows - r0 : plan.rows_per_pass;
    const dim3 grid(unsigned(blocks), unsigned((n + kBatch - 1) / kBatch));
    T* y_pass = static_cast<T*>(y) + r0 * out_features;
    kernel<<<grid, kThreads, plan.shared_bytes, stream>>>(
        reinterpret_cast<const uint32_t*>(bitmap), static_cast<const T*>(values), nnz, chunk_offsets,
        static_cast<const T*>(x) + r0 * in_features, static_cast<const T*>(bias), y_pass,
        static_cast<Acc*>(workspace), out_features, in_features, n, plan.slab_chunks, plan.splits);
    error = cudaGetLastError();
    if (error != cudaSuccess) return error;
    if (plan.splits > 1) {
      const int64_t count = n * out_features;
      const int64_t add_blocks = (count + 255) / 256 < 4096 ? (count + 255) / 256 : 4096;
      add_splits_kernel<T, Acc><<<unsigned(add_blocks), 256, 0, stream>>>(
          static_cast<const Acc*>(workspace), static_cast<const T*>(bias), y_pass, out_features, count, plan.splits);
      error = cudaGetLastError();
      if (error != cudaSuccess) return error;
    }
  }
  return cudaSuccess;
}

template <typename T, typename Acc>
cudaError_t launch_for_rows(const int32_t* bitmap, const void* values, int64_t nnz, const int64_t* chunk_offsets,
                            const void* x, const void* bias, void* y, void* workspace, int64_t out_features,
                            int64_t in_features, int64_t rows, cudaStream_t stream) {
  SharedLimit shared;
  cudaError_t error = cudaGetDevice(&shared.device);
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&shared.bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, shared.device);
  }
  if (error != cudaSuccess) return error;
  switch (fitting_batch_tile(rows, sizeof(T), sizeof(Acc), in_features, shared.bytes)) {
    case 1: return launch<T, Acc, 1>(bitmap, values, nnz, chunk_offsets, x, bias, y, workspace, out_features, in_features, rows, shared, stream);
    case 2: return launch<T, Acc, 2>(bitmap, values, nnz, chunk_offsets, x, bias, y, workspace, out_features, in_features, rows, shared, stream);
    case 4: return launch<T, Acc, 4>(bitmap, values, nnz, chunk_offsets, x, bias, y, workspace, out_features, in_features, rows, shared, stream);
    case 8: return launch<T, Acc, 8>(bitmap, values, nnz, chunk_offsets, x, bias, y, workspace, out_features, in_features, rows, shared, stream);
    default: return launch<T, Acc, 16>(bitmap, values, nnz, chunk_offsets, x, bias, y, workspace, out_features, in_features, rows, shared, stream);
  }
}

}  // namespace

size_t sparse_linear_workspace_bytes(FloatType type, int64_t out_features, int64_t in_features, int64_t rows) {
  if (rows == 0 || out_features == 0 || in_features == 0) return 0;
  const Plan plan = make_plan(batch_tile(rows), value_bytes(type), acc_bytes(type), in_features);
  if (plan.splits == 1) return 0;
  const int64_t pass_rows = rows < plan.rows_per_pass ? rows : plan.rows_per_pass;
  return size_t(plan.splits * pass_rows * out_features * acc_bytes(type));
}

cudaError_t sparse_linear_cuda(FloatType type, const int32_t* bitmap, const void* values, int64_t nnz,
                               const int64_t* chunk_offsets, const void* x, const void* bias, void* y,
                               void* workspace, int64_t out_features, int64_t in_features, int64_t rows,
                               cudaStream_t stream) {
  if (rows == 0 || out_features == 0 || in_features == 0) return cudaErrorInvalidValue;  // the glue's job
  switch (type) {
    case FloatType::kFloat16:
      return launch_for_rows<__half, float>(bitmap, values, nnz, chunk_offsets, x, bias, y, workspace, out_features, in_features, rows, stream);
    case FloatType::kBFloat16:
      return launch_for_rows<__nv_bfloat16, float>(bitmap, values, nnz, chunk_offsets, x, bias, y, workspace, out_features, in_features, rows, stream);
    case FloatType::kFloat32:
      return launch_for_rows<float, float>(bitmap, values, nnz, chunk_offsets, x, bias, y, workspace, out_features, in_features, rows, stream);
    case FloatType::kFloat64:
      return launch_for_rows<double, double>(bitmap, values, nnz, chunk_offsets, x, bias, y, workspace, out_features, in_features, rows, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sparsekern::cuda
