// Radix select on order-preserving keys of float bits: the device engine shared by topk_mask.cu
// and prune_grow.cu. Torch-free; see csrc/cuda/README.md for the pass structure and its cost.
//
// A selection runs over a list of tensors split into segments (one global selection = one
// segment; per-tensor or per-layer selections = one segment per tensor). The data are cut into
// tiles of kTile consecutive entries (flat, row-major order) that never cross a tensor, so tile
// order is flat-position order. Per segment the engine finds the threshold key T (the k-th best
// key) and how many entries equal to T to take; those go to the lowest positions, found by a scan
// of per-tile tie counts.
//
// Within a tile, thread t holds kItems entries in groups of V (V = 16 bytes / key size): group g
// holds positions (g * kThreads + t) * V ... + V - 1. Contiguous, 16-byte-aligned tensors are read
// with one 16-byte load per group; others (channels-last, sliced, misaligned) entry by entry
// through their strides. Every kernel reads all of a thread's items before using them.
//
// Nothing here reads back to the host, and every table reaches the device through kernel
// parameters (upload_kernel), so a whole selection can be captured in a CUDA graph.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda/radix_select.h"

#if defined(CUDART_VERSION) && CUDART_VERSION < 12010
#error "sparsekern's CUDA kernels pass tables of up to 32 KB as kernel parameters: CUDA 12.1 or newer"
#endif

namespace sparsekern::cuda::radix {

using u64 = unsigned long long;

constexpr int kThreads = 256;
constexpr int kItems = 16;
constexpr int64_t kTile = int64_t(kThreads) * kItems;
constexpr int kDigitBits = 12;  // 4096 bins: 16 KB of shared counters per block
constexpr int kBins = 1 << kDigitBits;
constexpr int kSelectThreads = 256;  // one block scans a segment's bins, 16 per thread (no spill)
constexpr int kBinsPerThread = kBins / kSelectThreads;

// Memory offset (in entries) of flat position i of a tensor with these sizes and strides. Strided
// tensors have under 2^32 entries (the glue copies larger ones), so the divisions are 32-bit: a
// 64-bit one is a subroutine call, whose register saves spill in every kernel that reads entries.
__device__ __forceinline__ int64_t strided_offset(const Strides& layout, int64_t i) {
  int64_t offset = 0;
  uint32_t rest = static_cast<uint32_t>(i);
  for (int d = layout.dims - 1; d >= 0; --d) {
    const uint32_t size = static_cast<uint32_t>(layout.sizes[d]);
    const uint32_t quotient = rest / size;
    offset += int64_t(rest - quotient * size) * layout.strides[d];
    rest = quotient;
  }
  return offset;
}

__device__ __forceinline__ int64_t offset_of(const TensorRef& ref, const Strides* strides, int64_t i) {
  return ref.strides < 0 ? i : strided_offset(strides[ref.strides], i);
}

// Order-preserving key of IEEE bits, branch-free (selects, no jumps): a larger number has a larger
// key, +0.0 and -0.0 share one key, every NaN maps to 0, below -inf, so NaN ranks last. `abs_mask`
// clears the sign bit to rank |score| (all ones otherwise).
template <typename Bits, Bits kInfBits>
__device__ __forceinline__ Bits to_key(Bits bits, Bits abs_mask) {
  constexpr Bits kSign = Bits(Bits(1) << (8 * sizeof(Bits) - 1));
  bits = Bits(bits & abs_mask);
  const Bits magnitude = Bits(bits & Bits(~kSign));
  const Bits flipped = (bits & kSign) ? Bits(~bits) : Bits(bits | kSign);
  const Bits key = magnitude == 0 ? kSign : flipped;
  return magnitude > kInfBits ? Bits(0) : key;
}

struct TensorEntry {
  TensorRef scores;
  TensorRef flags;  // eligibility bytes (any non-zero byte is set); data null: every entry eligible
  int64_t numel;
  int64_t first_tile;
  int segment;
  int vectorized;  // scores and flags contiguous and 16-byte aligned: one 16-byte load per group
};

struct SegmentState {
  u64 prefix;      // key bits decided so far
  u64 remaining;   // entries still to take among keys matching prefix (after the last pass: ties)
  u64 ties;        // entries equal to the threshold key (after the last pass)
  u64 nan_count;   // NaN scores among eligible entries (counted in the first pass)
  int64_t k;       // entries to select, or entries to leave out when k_is_complement
  int64_t first_tile;
  u64 candidates;       // keys appended to the candidate buffer (compaction)
  int k_is_complement;  // k counts the eligible entries *not* selected (prune_grow's keep step)
  int select_none;
  int compacted;        // passes 2.. read the candidate buffer
};

struct SelectTable {
  const TensorEntry* tensors;
  int num_tensors;
  int64_t num_tiles;
  SegmentState* states;
  const Strides* strides;  // layouts of non-contiguous tensors
  u64* hist;               // num_segments * kBins counters, zero between passes
  u64* tie_counts;         // one per tile
  u64* tie_offsets;        // exclusive scan of tie_counts
  int invert_eligible;     // select where a flag byte is zero instead
  int absolute;            // rank |score|
  void* candidates;        // keys of the compaction buffer
  u64 candidate_capacity;  // 0: no compaction (several segments, or keys of two passes)
};

template <typename Bits>
constexpr int num_passes() {
  return (8 * int(sizeof(Bits)) + kDigitBits - 1) / kDigitBits;
}

// Bits [low, high) of the key hold pass `pass`'s digit.
template <typename Bits>
__host__ __device__ constexpr int digit_high(int pass) {
  return 8 * int(sizeof(Bits)) - kDigitBits * pass;
}
template <typename Bits>
__host__ __device__ constexpr int digit_low(int pass) {
  return digit_high<Bits>(pass) > kDigitBits ? digit_high<Bits>(pass) - kDigitBits : 0;
}

__device__ __forceinline__ int tensor_of_tile(const SelectTable& table, int64_t tile) {
  int low = 0, high = table.num_tensors - 1;
  while (low < high) {  // the last tensor whose first tile is <= tile
    const int middle = (low + high + 1) / 2;
    if (table.tensors[middle].first_tile <= tile) low = middle; else high = middle - 1;
  }
  return low;
}

// Position in its tensor of item q of this thread, for a tile starting at `base`.
template <typename Bits>
__device__ __forceinline__ int64_t item_position(int64_t base, int q) {
  constexpr int V = 16 / int(sizeof(Bits));
  return base + (int64_t(q / V) * kThreads + threadIdx.x) * V + q % V;
}

// A tile's keys and eligibility, all loaded before any is used.
template <typename Bits>
struct Items {
  Bits keys[kItems];
  bool eligible[kItems];
};

template <int kBytes>
struct FlagWord;
template <>
struct FlagWord<2> { using Type = uint16_t; };
template <>
struct FlagWord<4> { using Type = uint32_t; };
template <>
struct FlagWord<8> { using Type = uint2; };

template <typename Bits, Bits kInfBits>
__device__ __forceinline__ void load_items(const SelectTable& table, const TensorEntry& entry, int64_t base,
                                           Items<Bits>& items) {
  constexpr int V = 16 / int(sizeof(Bits));
  constexpr int kGroups = kItems / V;
  const Bits abs_mask = table.absolute ? Bits(~Bits(Bits(1) << (8 * sizeof(Bits) - 1))) : Bits(~Bits(0));
  const Bits* scores = static_cast<const Bits*>(entry.scores.data);
  const uint8_t* flags = static_cast<const uint8_t*>(entry.flags.data);
  const bool invert = table.invert_eligible != 0;
  if (entry.vectorized && base + kTile <= entry.numel) {  // block-uniform
    union Scores {
      uint4 vector;
      Bits values[V];
    };
    union Flags {
      typename FlagWord<V>::Type word;
      uint8_t bytes[V];
    };
    Scores loaded[kGroups];
    Flags flag_words[kGroups];
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const int64_t first = base + (int64_t(g) * kThreads + threadIdx.x) * V;
      loaded[g].vector = __ldg(reinterpret_cast<const uint4*>(scores + first));
      if (flags != nullptr) {
        flag_words[g].word = __ldg(reinterpret_cast<const typename FlagWord<V>::Type*>(flags + first));
      }
    }
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        items.keys[g * V + l] = to_key<Bits, kInfBits>(loaded[g].values[l], abs_mask);
        items.eligible[g * V + l] = flags == nullptr || ((flag_words[g].bytes[l] != 0) != invert);
      }
    }
    return;
  }
  // Entry by entry (a tile exists only for a tensor with entries, so position 0 is in bounds).
  Bits bits[kItems];
  uint8_t flag[kItems];
#pragma unroll
  for (int q = 0; q < kItems; ++q) {
    const int64_t i = item_position<Bits>(base, q);
    const int64_t clamped = i < entry.numel ? i : 0;  // every load in bounds; masked below
    bits[q] = __ldg(scores + offset_of(entry.scores, table.strides, clamped));
    flag[q] = flags == nullptr ? uint8_t(0) : __ldg(flags + offset_of(entry.flags, table.strides, clamped));
  }
#pragma unroll
  for (int q = 0; q < kItems; ++q) {
    items.keys[q] = to_key<Bits, kInfBits>(bits[q], abs_mask);
    const bool inside = item_position<Bits>(base, q) < entry.numel;
    items.eligible[q] = inside && (flags == nullptr || ((flag[q] != 0) != invert));
  }
}

// Copies up to kUploadBytes of a host table into device memory, as a kernel parameter: graph
// capture records the bytes with the launch, and nothing waits for the host.
constexpr int kUploadBytes = 30000;
struct UploadChunk {
  char* destination;
  int size;
  alignas(16) unsigned char bytes[kUploadBytes];
};

// Internal linkage (static), as upload(): both .cu files include this header.
static __global__ void upload_kernel(const UploadChunk chunk) {
  for (int i = threadIdx.x; i < chunk.size; i += blockDim.x) chunk.destination[i] = chunk.bytes[i];
}

// Uploads `size` bytes at host `source` to device `destination`, in chunks, on `stream`.
static cudaError_t upload(void* destination, const void* source, size_t size, cudaStream_t stream) {
  thread_local UploadChunk chunk;  // 30 KB: too large for a caller's stack; the launch copies it
  for (size_t offset = 0; offset < size; offset += kUploadBytes) {
    const size_t part = size - offset < size_t(kUploadBytes) ? size - offset : size_t(kUploadBytes);
    chunk.destination = static_cast<char*>(destination) + offset;
    chunk.size = int(part);
    std::memcpy(chunk.bytes, static_cast<const char*>(source) + offset, part);
    upload_kernel<<<1, 256, 0, stream>>>(chunk);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

__device__ __forceinline__ void flush_histogram(unsigned int* shared_hist, unsigned int* shared_nan,
                                                u64* hist, SegmentState* state) {
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    if (shared_hist[b] != 0) atomicAdd(hist + b, u64(shared_hist[b]));
    shared_hist[b] = 0;
  }
  if (threadIdx.x == 0 && *shared_nan != 0) {
    atomicAdd(&state->nan_count, u64(*shared_nan));
    *shared_nan = 0;
  }
  __syncthreads();
}

// Tiles [first, last) of histogram block `block` of `blocks`: contiguous ranges, so a block meets
// few segments and flushes its counters rarely.
__device__ __forceinline__ void tile_range(int64_t num_tiles, int block, int blocks, int64_t* first, int64_t* last) {
  *first = num_tiles * block / blocks;
  *last = num_tiles * (block + 1) / blocks;
}

// Counts, per segment, the eligible keys that match the prefix chosen so far, by their digit of
// this pass. Each block walks a contiguous range of tiles and flushes its shared counters when the
// segment changes.
//
// Compaction (one-segment selections of keys needing more than two passes, when the bin chosen in
// pass 0 holds at most candidate_capacity entries): pass 1 also appends the keys matching pass 0's
// prefix to `candidates`, and later passes read only those instead of every score.
template <typename Bits, Bits kInfBits>
__global__ void __launch_bounds__(kThreads) histogram_kernel(SelectTable table, int pass) {
  using Scan = cub::BlockScan<unsigned int, kThreads>;
  __shared__ unsigned int shared_hist[kBins];
  __shared__ unsigned int shared_nan;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ u64 write_base;
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) shared_hist[b] = 0;
  if (threadIdx.x == 0) shared_nan = 0;
  __syncthreads();
  const int high = digit_high<Bits>(pass), low = digit_low<Bits>(pass);
  const u64 digit_mask = (u64(1) << (high - low)) - 1;
  const bool first_pass = high == 8 * int(sizeof(Bits));
  Bits* candidates = static_cast<Bits*>(table.candidates);
  const bool compacted = table.candidate_capacity > 0 && table.states[0].compacted;

  if (pass >= 2 && compacted) {
    SegmentState& state = table.states[0];
    const u64 prefix = state.prefix, count = state.candidates;
    for (u64 i = u64(blockIdx.x) * kThreads + threadIdx.x; i < count; i += u64(gridDim.x) * kThreads) {
      const u64 key = candidates[i];
      if ((key >> high) == (prefix >> high)) atomicAdd(shared_hist + ((key >> low) & digit_mask), 1u);
    }
    flush_histogram(shared_hist, &shared_nan, table.hist, &state);
    return;
  }

  const bool write_candidates = pass == 1 && compacted;
  int64_t first_tile, last_tile;
  tile_range(table.num_tiles, blockIdx.x, gridDim.x, &first_tile, &last_tile);
  int segment = -1;
  for (int64_t tile = first_tile; tile < last_tile; ++tile) {
    const TensorEntry entry = table.tensors[tensor_of_tile(table, tile)];
    if (entry.segment != segment) {
      if (segment >= 0) {
        flush_histogram(shared_hist, &shared_nan, table.hist + int64_t(segment) * kBins,
                        table.states + segment);
      }
      segment = entry.segment;
    }
    const SegmentState& state = table.states[segment];
    if (state.select_none) continue;  // block-uniform
    const u64 prefix = state.prefix;
    Items<Bits> items;
    load_items<Bits, kInfBits>(table, entry, (tile - entry.first_tile) * kTile, items);
    unsigned int nan_here = 0, matches = 0;
    bool counted[kItems];
#pragma unroll
    for (int q = 0; q < kItems; ++q) {
      const u64 key = items.keys[q];
      nan_here += items.eligible[q] && key == 0;
      // Pass 0 has no decided bits; later passes count only keys sharing the chosen prefix.
      counted[q] = items.eligible[q] && (first_pass || (key >> high) == (prefix >> high));
      if (counted[q]) {
        atomicAdd(shared_hist + ((key >> low) & digit_mask), 1u);
        ++matches;
      }
    }
    if (pass == 0 && nan_here != 0) atomicAdd(&shared_nan, nan_here);
    if (write_candidates) {  // block-uniform; one global atomic per tile
      unsigned int offset = 0, total = 0;
      Scan(scan_storage).ExclusiveSum(matches, offset, total);
      if (threadIdx.x == 0) write_base = atomicAdd(&table.states[0].candidates, u64(total));
      __syncthreads();
      Bits* out = candidates + write_base + offset;
#pragma unroll
      for (int q = 0; q < kItems; ++q) {
        if (counted[q]) *out++ = items.keys[q];
      }
      __syncthreads();
    }
  }
  if (segment >= 0) {
    flush_histogram(shared_hist, &shared_nan, table.hist + int64_t(segment) * kBins, table.states + segment);
  }
}

// One block per segment: finds the bin that holds the remaining-th best key, appends its digit to
// the prefix, and zeroes the bins for the next pass.
template <typename Bits>
__global__ void __launch_bounds__(kSelectThreads) select_digit_kernel(SelectTable table, int pass) {
  using Scan = cub::BlockScan<u64, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  SegmentState* state = table.states + blockIdx.x;
  u64* hist = table.hist + int64_t(blockIdx.x) * kBins;
  const int high = digit_high<Bits>(pass), low = digit_low<Bits>(pass);
  const int bins = 1 << (high - low);
  // Bins from the top: thread t holds bins bins-1-16t .. bins-16-16t, so a scan counts better keys.
  u64 count[kBinsPerThread];
  u64 sum = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    const int bin = bins - 1 - (threadIdx.x * kBinsPerThread + j);
    count[j] = bin >= 0 ? hist[bin] : 0;
    sum += count[j];
  }
  u64 better = 0, total = 0;
  Scan(scan_storage).ExclusiveSum(sum, better, total);
  const bool none = state->select_none != 0;
  u64 remaining = state->remaining;
  if (pass == 0) {
    // A complement k larger than the eligible count (a wrong count from the caller) takes nothing.
    remaining = state->k_is_complement ? (u64(state->k) < total ? total - u64(state->k) : 0) : u64(state->k);
  }
  __syncthreads();
  if (!none && remaining == 0 && threadIdx.x == 0) state->select_none = 1;
  if (!none && remaining != 0) {
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      const int bin = bins - 1 - (threadIdx.x * kBinsPerThread + j);
      if (bin >= 0 && better < remaining && remaining <= better + count[j]) {
        state->prefix |= u64(bin) << low;
        state->remaining = remaining - better;
        state->ties = count[j];
        if (pass == 0) state->compacted = count[j] <= table.candidate_capacity;
      }
      better += count[j];
    }
  }
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    const int bin = bins - 1 - (threadIdx.x * kBinsPerThread + j);
    if (bin >= 0) hist[bin] = 0;
  }
}

__device__ __forceinline__ bool takes_every_tie(const SegmentState& state) {
  return state.select_none || state.remaining == state.ties;
}

// Per tile: how many eligible entries equal the threshold, where only some ties are taken.
template <typename Bits, Bits kInfBits>
__global__ void __launch_bounds__(kThreads) tie_count_kernel(SelectTable table) {
  using Reduce = cub::BlockReduce<u64, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int64_t tile = blockIdx.x;
  const TensorEntry entry = table.tensors[tensor_of_tile(table, tile)];
  const SegmentState& state = table.states[entry.segment];
  if (takes_every_tie(state)) {
    if (threadIdx.x == 0) table.tie_counts[tile] = 0;
    return;
  }
  const Bits threshold = Bits(state.prefix);
  Items<Bits> items;
  load_items<Bits, kInfBits>(table, entry, (tile - entry.first_tile) * kTile, items);
  u64 ties = 0;
#pragma unroll
  for (int q = 0; q < kItems; ++q) ties += items.eligible[q] && items.keys[q] == threshold;
  const u64 tile_ties = Reduce(reduce_storage).Sum(ties);
  if (threadIdx.x == 0) table.tie_counts[tile] = tile_ties;
}

// Per tile: decides every entry (key above the threshold, or a tie early enough in position order)
// and hands (tensor, position, selected) to the epilogue, which writes the outputs. Bounds that let
// ptxas use the registers it needs (80-96): at the default it spilled 16-24 bytes.
template <typename Bits, Bits kInfBits, typename Epilogue>
__global__ void __launch_bounds__(kThreads, 1) mask_kernel(SelectTable table, Epilogue epilogue) {
  using Scan = cub::BlockScan<u64, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  constexpr int V = 16 / int(sizeof(Bits));
  const int64_t tile = blockIdx.x;
  const int tensor = tensor_of_tile(table, tile);
  const TensorEntry entry = table.tensors[tensor];
  const SegmentState& state = table.states[entry.segment];
  const bool none = state.select_none != 0;
  const bool every_tie = takes_every_tie(state);
  const Bits threshold = Bits(state.prefix);
  const int64_t base = (tile - entry.first_tile) * kTile;
  Items<Bits> items;
  load_items<Bits, kInfBits>(table, entry, base, items);
  bool selected[kItems];
#pragma unroll
  for (int q = 0; q < kItems; ++q) {
    const bool eligible = items.eligible[q] && !none;
    selected[q] = eligible && (items.keys[q] > threshold || (every_tie && items.keys[q] == threshold));
  }
  if (!every_tie) {  // block-uniform: the tile lies in one segment
    // Ties before this tile in the segment, then within it in position order: group by group,
    // thread by thread, item by item.
    u64 ties_before = table.tie_offsets[tile] - table.tie_offsets[state.first_tile];
#pragma unroll
    for (int g = 0; g < kItems / V; ++g) {
      u64 mine = 0;
#pragma unroll
      for (int l = 0; l < V; ++l) {
        const int q = g * V + l;
        mine += items.eligible[q] && !none && items.keys[q] == threshold;
      }
      u64 rank = 0, group_ties = 0;
      Scan(scan_storage).ExclusiveSum(mine, rank, group_ties);
      __syncthreads();
#pragma unroll
      for (int l = 0; l < V; ++l) {
        const int q = g * V + l;
        if (items.eligible[q] && !none && items.keys[q] == threshold) {
          selected[q] = ties_before + rank < state.remaining;
          ++rank;
        }
      }
      ties_before += group_ties;
    }
  }
#pragma unroll
  for (int q = 0; q < kItems; ++q) {
    const int64_t i = item_position<Bits>(base, q);
    if (i < entry.numel) epilogue(tensor, i, selected[q]);
  }
}

inline int64_t tiles_of(int64_t numel) { return (numel + kTile - 1) / kTile; }

// Device workspace of one or more selections over the same tiles, carved from one buffer. The
// region `table` holds everything uploaded (tensor entries, segment states, strides, the caller's
// tables); the rest is scratch.
struct Workspace {
  void* table;
  u64* hist;
  u64* tie_counts;
  u64* tie_offsets;
  void* scan_temp;
  size_t scan_temp_bytes;
  void* candidates;
};

inline size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

inline int key_bytes(FloatType type) {
  return type == FloatType::kFloat64 ? 8 : type == FloatType::kFloat32 ? 4 : 2;
}

// Candidate keys kept for compaction: a sixteenth of the entries, enough for the bin of a 12-bit
// digit around most thresholds of smooth score distributions (a uniform one puts 1/16 there at
// worst); a fuller bin falls back to reading every score. Keys of two passes gain nothing.
inline u64 candidate_capacity(FloatType type, int64_t total_numel, int num_segments) {
  return num_segments == 1 && key_bytes(type) > 2 ? u64(total_numel / 16) : 0;
}

// Lays out the workspace; with base == nullptr it only measures.
inline size_t layout_workspace(void* base, size_t table_bytes, int num_segments, int64_t num_tiles,
                               size_t candidate_bytes, Workspace* out) {
  size_t scan_temp_bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, scan_temp_bytes, static_cast<u64*>(nullptr),
                                static_cast<u64*>(nullptr), num_tiles > 0 ? num_tiles : 1);
  constexpr int kRegions = 6;
  const size_t sizes[kRegions] = {table_bytes,                   sizeof(u64) * kBins * num_segments,
                                  sizeof(u64) * (num_tiles + 1), sizeof(u64) * (num_tiles + 1),
                                  scan_temp_bytes,               candidate_bytes};
  char* cursor = static_cast<char*>(base);
  void* regions[kRegions];
  size_t total = 0;
  for (int r = 0; r < kRegions; ++r) {
    regions[r] = cursor ? cursor + total : nullptr;
    total += align_up(sizes[r]);
  }
  if (out) {
    *out = Workspace{regions[0], static_cast<u64*>(regions[1]), static_cast<u64*>(regions[2]),
                     static_cast<u64*>(regions[3]), regions[4], scan_temp_bytes, regions[5]};
  }
  return total;
}

// Blocks of the histogram pass: as many as are resident at once (the occupancy API says how many
// of this kernel fit per SM), but no more than tiles.
template <typename Bits, Bits kInfBits>
int histogram_grid(int64_t num_tiles) {
  static int resident = [] {
    int device = 0, processors = 1, per_sm = 1;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, histogram_kernel<Bits, kInfBits>, kThreads, 0);
    return processors * (per_sm > 0 ? per_sm : 1);
  }();
  return int(num_tiles < resident ? num_tiles : resident);
}

// Runs passes first_pass..last_pass of the radix select; after the last one each segment's state
// holds its threshold key and the number of ties to take. Pass 0 also counts NaN.
template <typename Bits, Bits kInfBits>
cudaError_t run_passes(const SelectTable& table, int num_segments, int first_pass, int last_pass,
                       cudaStream_t stream) {
  const int grid = histogram_grid<Bits, kInfBits>(table.num_tiles);
  for (int pass = first_pass; pass <= last_pass && pass < num_passes<Bits>(); ++pass) {
    if (grid > 0) histogram_kernel<Bits, kInfBits><<<grid, kThreads, 0, stream>>>(table, pass);
    select_digit_kernel<Bits><<<num_segments, kSelectThreads, 0, stream>>>(table, pass);
  }
  return cudaGetLastError();
}

// Tie ranks and the mask pass, after run_passes has fixed every threshold.
template <typename Bits, Bits kInfBits, typename Epilogue>
cudaError_t run_mask(const SelectTable& table, const Workspace& workspace, Epilogue epilogue,
                     cudaStream_t stream) {
  if (table.num_tiles == 0) return cudaGetLastError();
  tie_count_kernel<Bits, kInfBits><<<table.num_tiles, kThreads, 0, stream>>>(table);
  size_t temp_bytes = workspace.scan_temp_bytes;
  cudaError_t error = cub::DeviceScan::ExclusiveSum(workspace.scan_temp, temp_bytes, table.tie_counts,
                                                    table.tie_offsets, table.num_tiles, stream);
  if (error != cudaSuccess) return error;
  mask_kernel<Bits, kInfBits, Epilogue><<<table.num_tiles, kThreads, 0, stream>>>(table, epilogue);
  return cudaGetLastError();
}

// The bits of +inf of each float type: with the bits' width, the template arguments of the kernels
// for that type (the files that instantiate one type each name them too).
constexpr uint16_t kFloat16Inf = 0x7C00;
constexpr uint16_t kBFloat16Inf = 0x7F80;
constexpr uint32_t kFloat32Inf = 0x7F800000u;
constexpr u64 kFloat64Inf = 0x7FF0000000000000ull;

// Calls body.template operator()<Bits, kInfBits>() for the float type's bit layout.
template <typename Body>
cudaError_t dispatch_float(FloatType type, Body&& body) {
  switch (type) {
    case FloatType::kFloat16: return body.template operator()<uint16_t, kFloat16Inf>();
    case FloatType::kBFloat16: return body.template operator()<uint16_t, kBFloat16Inf>();
    case FloatType::kFloat32: return body.template operator()<uint32_t, kFloat32Inf>();
    case FloatType::kFloat64: return body.template operator()<u64, kFloat64Inf>();
  }
  return cudaErrorInvalidValue;
}

// Host images of the tables of one or more selections, laid out as they will be on the device:
// append() returns each piece's offset in the upload.
class HostTable {
 public:
  template <typename T>
  size_t append(const T* items, size_t count) {
    const size_t offset = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(offset + sizeof(T) * count);
    if (count > 0) std::memcpy(bytes_.data() + offset, items, sizeof(T) * count);
    return offset;
  }
  size_t size() const { return bytes_.size(); }
  const unsigned char* data() const { return bytes_.data(); }

  template <typename T>
  static T* at(void* device_table, size_t offset) {
    return reinterpret_cast<T*>(static_cast<char*>(device_table) + offset);
  }

 private:
  std::vector<unsigned char> bytes_;
};

}  // namespace sparsekern::cuda::radix
