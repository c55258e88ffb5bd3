// Radix select on order-preserving keys of float bits: the device engine shared by topk_mask.cu
// and prune_grow.cu. Torch-free; see csrc/cuda/README.md for the pass structure and its cost.
//
// A selection runs over a list of tensors split into segments (one global selection = one
// segment; the per-tensor variant = one segment per tensor). The data are cut into tiles of
// kTile consecutive entries that never cross a tensor, so tile order is flat-position order.
// Per segment the engine finds the threshold key T (the k-th best key) and how many entries equal
// to T to take; those go to the lowest positions, found by a scan of per-tile tie counts.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/radix_select.h"

namespace sparsekern::cuda::radix {

using u64 = unsigned long long;

constexpr int kThreads = 256;
constexpr int kItems = 16;
constexpr int64_t kTile = int64_t(kThreads) * kItems;
constexpr int kDigitBits = 12;  // 4096 bins: 16 KB of shared counters per block
constexpr int kBins = 1 << kDigitBits;
constexpr int kSelectThreads = 1024;  // one block scans a segment's bins, 4 per thread

// Order-preserving key of IEEE bits: a larger number has a larger key, +0.0 and -0.0 share one
// key, and every NaN maps to 0, below -inf, so NaN ranks last.
template <typename Bits, Bits kInfBits>
__device__ __forceinline__ Bits to_key(Bits bits) {
  constexpr Bits kSign = Bits(Bits(1) << (8 * sizeof(Bits) - 1));
  const Bits magnitude = Bits(bits & Bits(~kSign));
  if (magnitude > kInfBits) return Bits(0);
  if (magnitude == 0) return kSign;
  return (bits & kSign) ? Bits(~bits) : Bits(bits | kSign);
}

struct TensorEntry {
  const void* scores;
  const bool* eligible;  // null: every entry may be selected
  int64_t numel;
  int64_t first_tile;
  int segment;
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
  u64* hist;               // num_segments * kBins counters, zero between passes
  u64* tie_counts;         // one per tile
  u64* tie_offsets;        // exclusive scan of tie_counts
  bool invert_eligible;    // select where eligible[i] is false instead
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

__device__ __forceinline__ bool is_eligible(const TensorEntry& entry, int64_t i, bool invert) {
  return entry.eligible == nullptr || (entry.eligible[i] != invert);
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

// Counts, per segment, the eligible keys that match the prefix chosen so far, by their digit of
// this pass. A persistent grid strides over tiles and flushes its shared counters when the
// segment changes, so global atomics stay few. Each thread loads its kItems keys before using
// them, so many loads are in flight.
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
  int segment = -1;
  for (int64_t tile = blockIdx.x; tile < table.num_tiles; tile += gridDim.x) {
    const TensorEntry entry = table.tensors[tensor_of_tile(table, tile)];
    if (entry.segment != segment) {
      if (segment >= 0) {
        flush_histogram(shared_hist, &shared_nan, table.hist + int64_t(segment) * kBins,
                        table.states + segment);
      }
      segment = entry.segment;
    }
    SegmentState& state = table.states[segment];
    if (state.select_none) continue;  // block-uniform
    const u64 prefix = state.prefix;
    const Bits* scores = static_cast<const Bits*>(entry.scores);
    const int64_t base = (tile - entry.first_tile) * kTile;
    Bits keys[kItems];
    bool counted[kItems];
#pragma unroll
    for (int item = 0; item < kItems; ++item) {
      const int64_t i = base + int64_t(item) * kThreads + threadIdx.x;
      counted[item] = i < entry.numel && is_eligible(entry, i, table.invert_eligible);
      keys[item] = counted[item] ? to_key<Bits, kInfBits>(scores[i]) : Bits(0);
    }
    unsigned int nan_here = 0, matches = 0;
#pragma unroll
    for (int item = 0; item < kItems; ++item) {
      if (!counted[item]) continue;
      const u64 key = keys[item];
      nan_here += key == 0;
      // Pass 0 has no decided bits; later passes count only keys sharing the chosen prefix.
      counted[item] = first_pass || (key >> high) == (prefix >> high);
      if (counted[item]) {
        atomicAdd(shared_hist + ((key >> low) & digit_mask), 1u);
        ++matches;
      }
    }
    if (pass == 0 && nan_here != 0) atomicAdd(&shared_nan, nan_here);
    if (write_candidates) {  // block-uniform; one global atomic per tile
      unsigned int offset = 0, total = 0;
      Scan(scan_storage).ExclusiveSum(matches, offset, total);
      if (threadIdx.x == 0) write_base = atomicAdd(&state.candidates, u64(total));
      __syncthreads();
      Bits* out = candidates + write_base + offset;
#pragma unroll
      for (int item = 0; item < kItems; ++item) {
        if (counted[item]) *out++ = keys[item];
      }
      __syncthreads();
    }
  }
  if (segment >= 0) {
    flush_histogram(shared_hist, &shared_nan, table.hist + int64_t(segment) * kBins,
                    table.states + segment);
  }
}

// One block per segment: finds the bin that holds the remaining-th best key, appends its digit to
// the prefix, and zeroes the bins for the next pass.
template <typename Bits>
__global__ void __launch_bounds__(kSelectThreads) select_digit_kernel(SelectTable table, int pass) {
  using Scan = cub::BlockScan<u64, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  constexpr int kPerThread = kBins / kSelectThreads;
  SegmentState* state = table.states + blockIdx.x;
  u64* hist = table.hist + int64_t(blockIdx.x) * kBins;
  const int high = digit_high<Bits>(pass), low = digit_low<Bits>(pass);
  const int bins = 1 << (high - low);
  // Bins from the top: thread t holds bins bins-1-4t .. bins-4-4t, so a scan counts better keys.
  u64 count[kPerThread];
  u64 sum = 0;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int bin = bins - 1 - (threadIdx.x * kPerThread + j);
    count[j] = bin >= 0 ? hist[bin] : 0;
    sum += count[j];
  }
  u64 better = 0, total = 0;
  Scan(scan_storage).ExclusiveSum(sum, better, total);
  const bool none = state->select_none != 0;
  u64 remaining = state->remaining;
  if (pass == 0) remaining = state->k_is_complement ? total - u64(state->k) : u64(state->k);
  __syncthreads();
  if (!none && remaining == 0 && threadIdx.x == 0) state->select_none = 1;
  if (!none && remaining != 0) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int bin = bins - 1 - (threadIdx.x * kPerThread + j);
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
  for (int j = 0; j < kPerThread; ++j) {
    const int bin = bins - 1 - (threadIdx.x * kPerThread + j);
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
  const Bits* scores = static_cast<const Bits*>(entry.scores);
  const int64_t base = (tile - entry.first_tile) * kTile;
  u64 ties = 0;
#pragma unroll 4
  for (int item = 0; item < kItems; ++item) {
    const int64_t i = base + int64_t(item) * kThreads + threadIdx.x;
    if (i < entry.numel && is_eligible(entry, i, table.invert_eligible)) {
      ties += to_key<Bits, kInfBits>(scores[i]) == threshold;
    }
  }
  const u64 tile_ties = Reduce(reduce_storage).Sum(ties);
  if (threadIdx.x == 0) table.tie_counts[tile] = tile_ties;
}

// Per tile: decides every entry (key above the threshold, or a tie early enough in position
// order) and hands (tensor, position, selected) to the epilogue, which writes the outputs.
template <typename Bits, Bits kInfBits, typename Epilogue>
__global__ void __launch_bounds__(kThreads) mask_kernel(SelectTable table, Epilogue epilogue) {
  using Scan = cub::BlockScan<u64, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t tile = blockIdx.x;
  const int tensor = tensor_of_tile(table, tile);
  const TensorEntry entry = table.tensors[tensor];
  const SegmentState& state = table.states[entry.segment];
  const bool none = state.select_none != 0;
  const bool every_tie = takes_every_tie(state);
  const Bits threshold = Bits(state.prefix);
  // Ties before this tile in the segment, in flat-position order.
  u64 ties_before = every_tie ? 0 : table.tie_offsets[tile] - table.tie_offsets[state.first_tile];
  const Bits* scores = static_cast<const Bits*>(entry.scores);
  const int64_t base = (tile - entry.first_tile) * kTile;
  for (int item = 0; item < kItems; ++item) {
    const int64_t i = base + int64_t(item) * kThreads + threadIdx.x;
    const bool inside = i < entry.numel;
    const bool eligible = inside && is_eligible(entry, i, table.invert_eligible);
    const Bits key = eligible ? to_key<Bits, kInfBits>(scores[i]) : Bits(0);
    bool selected = eligible && !none && key > threshold;
    if (eligible && !none && key == threshold) selected = every_tie;
    if (!every_tie) {  // block-uniform: the tile lies in one segment
      u64 rank = 0, tile_row_ties = 0;
      const bool tie = eligible && key == threshold;
      Scan(scan_storage).ExclusiveSum(u64(tie), rank, tile_row_ties);
      __syncthreads();
      if (tie) selected = ties_before + rank < state.remaining;
      ties_before += tile_row_ties;
    }
    if (inside) epilogue(tensor, i, selected);
  }
}

inline int64_t tiles_of(int64_t numel) { return (numel + kTile - 1) / kTile; }

// Device workspace of one or more selections over the same tiles, carved from one buffer.
struct Workspace {
  TensorEntry* tensors;
  SegmentState* states;
  u64* hist;
  u64* tie_counts;
  u64* tie_offsets;
  void* scan_temp;
  size_t scan_temp_bytes;
  void* candidates;
  void* extra;  // caller-defined tables (prune_grow's state pointers)
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

// Lays out the workspace; with base == nullptr it only measures. `tables` selections share the
// histogram, tie and candidate buffers but have their own tensor entries and segment states.
inline size_t layout_workspace(void* base, int num_tensors, int num_segments, int64_t num_tiles,
                               int tables, size_t candidate_bytes, size_t extra_bytes, Workspace* out) {
  size_t scan_temp_bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, scan_temp_bytes, static_cast<u64*>(nullptr),
                                static_cast<u64*>(nullptr), num_tiles > 0 ? num_tiles : 1);
  constexpr int kRegions = 8;
  const size_t sizes[kRegions] = {
      sizeof(TensorEntry) * num_tensors * tables, sizeof(SegmentState) * num_segments * tables,
      sizeof(u64) * kBins * num_segments,         sizeof(u64) * (num_tiles + 1),
      sizeof(u64) * (num_tiles + 1),              scan_temp_bytes,
      candidate_bytes,                            extra_bytes};
  char* cursor = static_cast<char*>(base);
  void* regions[kRegions];
  size_t total = 0;
  for (int r = 0; r < kRegions; ++r) {
    regions[r] = cursor ? cursor + total : nullptr;
    total += align_up(sizes[r]);
  }
  if (out) {
    *out = Workspace{static_cast<TensorEntry*>(regions[0]), static_cast<SegmentState*>(regions[1]),
                     static_cast<u64*>(regions[2]),         static_cast<u64*>(regions[3]),
                     static_cast<u64*>(regions[4]),         regions[5],
                     scan_temp_bytes,                       regions[6],
                     regions[7]};
  }
  return total;
}

inline int histogram_grid(int64_t num_tiles) {
  int device = 0, processors = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device);
  const int64_t persistent = int64_t(processors) * 8;
  return int(num_tiles < persistent ? num_tiles : persistent);
}

// Runs passes first_pass..last_pass of the radix select; after the last one each segment's state
// holds its threshold key and the number of ties to take. Pass 0 also counts NaN.
template <typename Bits, Bits kInfBits>
cudaError_t run_passes(const SelectTable& table, int num_segments, int first_pass, int last_pass,
                       cudaStream_t stream) {
  const int grid = histogram_grid(table.num_tiles);
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

// Calls body.template operator()<Bits, kInfBits>() for the float type's bit layout.
template <typename Body>
cudaError_t dispatch_float(FloatType type, Body&& body) {
  switch (type) {
    case FloatType::kFloat16: return body.template operator()<uint16_t, uint16_t(0x7C00)>();
    case FloatType::kBFloat16: return body.template operator()<uint16_t, uint16_t(0x7F80)>();
    case FloatType::kFloat32: return body.template operator()<uint32_t, uint32_t(0x7F800000u)>();
    case FloatType::kFloat64:
      return body.template operator()<u64, u64(0x7FF0000000000000ull)>();
  }
  return cudaErrorInvalidValue;
}

}  // namespace sparsekern::cuda::radix
