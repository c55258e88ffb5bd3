// Exact top-k selection over a virtual concatenation of arrays by radix select, shared by the CPU
// kernels of topk_mask and prune_grow.
//
// The rule (sparsekern/ops/reference.py): larger score first; NaN below every number; +0.0 equals -0.0;
// equal scores go to the lower flat position. Each score becomes an unsigned key whose integer order
// is that rule's order among values, so selecting the k best is finding the k-th best key digit by
// digit from histograms. A Selector does the histogram passes and stops at the first digit whose
// chosen bin (the "boundary") is small, or at the last digit. The caller's final pass then takes
// every key above the boundary and settles the boundary keys: when the boundary is a whole key
// (exact), its first `take` keys in flat order, counted per block; otherwise the boundary keys are
// collected as candidates during that pass and `take_best` picks among them afterwards. For smooth
// float32 scores that is two reads of the scores (one histogram, one final pass) and no sort.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace sparsekern::cpu {

// Bits of each score dtype, and the bit pattern of +inf: any larger magnitude is a NaN.
template <typename scalar_t>
struct KeyTraits;
template <>
struct KeyTraits<c10::Half> {
  using Key = uint16_t;
  static constexpr Key kInfinity = 0x7C00;
};
template <>
struct KeyTraits<c10::BFloat16> {
  using Key = uint16_t;
  static constexpr Key kInfinity = 0x7F80;
};
template <>
struct KeyTraits<float> {
  using Key = uint32_t;
  static constexpr Key kInfinity = 0x7F800000u;
};
template <>
struct KeyTraits<double> {
  using Key = uint64_t;
  static constexpr Key kInfinity = 0x7FF0000000000000ull;
};

// Keys 0 and 1 are free: the smallest number, -inf, maps far above them. 0 marks an entry that may
// not be selected at all (callers' eligibility), 1 a NaN that may be taken after every number
// (prune_grow); topk_mask never selects NaN, so it maps NaN to 0 as well.
constexpr uint64_t kIneligibleKey = 0;
constexpr uint64_t kNaNKey = 1;

// How a score's bits become a key: `abs_mask` clears the sign bit to rank |score| (all ones
// otherwise) and `nan_key` is what a NaN becomes.
template <typename scalar_t>
struct KeyRule {
  using Key = typename KeyTraits<scalar_t>::Key;
  Key abs_mask;
  Key nan_key;

  KeyRule(bool absolute, uint64_t nan) : abs_mask(absolute ? Key(~kSign) : Key(~Key(0))), nan_key(Key(nan)) {}

  static constexpr int kTopBit = 8 * sizeof(Key) - 1;
  static constexpr Key kSign = Key(Key(1) << kTopBit);

  // Order-preserving key of a score's bits: flipping the sign bit of a positive float and every bit
  // of a negative one makes unsigned integer order equal float order. Branch-free, so loops vectorize.
  inline Key operator()(Key bits) const {
    bits = Key(bits & abs_mask);
    const Key magnitude = Key(bits & Key(~kSign));
    bits = magnitude == 0 ? Key(0) : bits;  // -0.0 ranks as +0.0
    const Key flip = Key(Key(0 - Key(bits >> kTopBit)) | kSign);
    return magnitude > KeyTraits<scalar_t>::kInfinity ? nan_key : Key(bits ^ flip);
  }
};

// Positions [begin, end) of array `part`, at most 2^15 of them: the unit of work.
struct Span {
  int64_t part;
  int64_t begin;
  int64_t end;
};

// Positions a final pass handles at once: its keys and flags fit in L1.
constexpr int64_t kChunk = 1024;

// The flat order over arrays of the given sizes, cut into spans, with the spans grouped into
// contiguous blocks of about equal length: one block per thread, or a single block when the
// caller already runs in a parallel region (one selection per thread).
class Layout {
 public:
  explicit Layout(const std::vector<int64_t>& part_sizes) {
    for (int64_t part = 0; part < static_cast<int64_t>(part_sizes.size()); ++part) {
      for (int64_t begin = 0; begin < part_sizes[part]; begin += kSpanSize) {
        spans_.push_back({part, begin, std::min(part_sizes[part], begin + kSpanSize)});
      }
      total_ += part_sizes[part];
    }
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    // Few enough positions per block for 32-bit counts.
    const int64_t blocks = std::max(std::clamp<int64_t>(total_ / kMinBlockSize, 1, threads),
                                    total_ / kMaxBlockSize + 1);
    // A span belongs to the block its first position falls in, so blocks differ by under one span.
    block_begin_.assign(blocks + 1, spans_.size());
    int64_t start = 0;
    int64_t block = 0;
    for (size_t s = 0; s < spans_.size(); ++s) {
      while (block < blocks && start >= block * total_ / blocks) block_begin_[block++] = s;
      start += spans_[s].end - spans_[s].begin;
    }
    while (block < blocks) block_begin_[block++] = spans_.size();
  }

  int64_t total() const { return total_; }
  int64_t blocks() const { return static_cast<int64_t>(block_begin_.size()) - 1; }

  // Calls work(block, span) for every span, blocks in parallel, spans of a block in flat order.
  template <typename Work>
  void for_each_span(const Work& work) const {
    at::parallel_for(0, blocks(), 1, [&](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        for (size_t s = block_begin_[block]; s < block_begin_[block + 1]; ++s) work(block, spans_[s]);
      }
    });
  }

  // Calls work(block, part, begin, end) for every chunk of at most kChunk positions.
  template <typename Work>
  void for_each_chunk(const Work& work) const {
    for_each_span([&](int64_t block, const Span& span) {
      for (int64_t begin = span.begin; begin < span.end; begin += kChunk) {
        work(block, span.part, begin, std::min(span.end, begin + kChunk));
      }
    });
  }

 private:
  static constexpr int64_t kSpanSize = int64_t(1) << 15;
  static constexpr int64_t kMinBlockSize = int64_t(1) << 15;
  static constexpr int64_t kMaxBlockSize = int64_t(1) << 31;
  std::vector<Span> spans_;
  std::vector<size_t> block_begin_;
  int64_t total_ = 0;
};

// Spare histogram bins past the last digit's, for keys that do not count.
constexpr int64_t kSpareMask = 15;

// Adds one to histogram[digit] for every eligible key of keys[0, size) that starts with `prefix` (the
// bits under high_mask), where digit = (key >> shift) & digit_mask. Arguments by value: the compiler
// then knows that the increments change none of them.
template <typename Key>
void count_digits(const Key* __restrict keys, const int64_t size, const int shift, const Key high_mask,
                  const Key prefix, const int64_t digit_mask, uint32_t* __restrict histogram) {
  if (high_mask == 0) {
    // The first digit: every eligible key counts. Ineligible ones (never taken) go to spare bins
    // past the histogram, in turn, rather than through a branch that mispredicts or into one bin
    // that every increment would have to wait for.
    for (int64_t i = 0; i < size; ++i) {
      const Key key = keys[i];
      const int64_t eligible = -static_cast<int64_t>(key != Key(kIneligibleKey));
      const int64_t digit = static_cast<int64_t>(key >> shift) & digit_mask;
      ++histogram[(digit & eligible) | ((digit_mask + 1 + (i & kSpareMask)) & ~eligible)];
    }
    return;
  }
  // Later digits: few keys share the prefix, so test a group at once in a loop that vectorizes
  // (bitwise &, no branch) and count one by one only in groups with a match.
  const auto counts = [&](Key key) { return (key != Key(kIneligibleKey)) & ((key & high_mask) == prefix); };
  constexpr int64_t kGroup = 32;
  for (int64_t i = 0; i < size; i += kGroup) {
    const int64_t last = std::min(size, i + kGroup);
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t j = i; j < last; ++j) any |= counts(keys[j]);
    if (!any) continue;
    for (int64_t j = i; j < last; ++j) {
      if (counts(keys[j])) ++histogram[(keys[j] >> shift) & digit_mask];
    }
  }
}

// What a final pass does with a key: where it stands against the boundary the Selector found.
enum Place : uint8_t { kBelow = 0, kBoundary = 1, kAbove = 2 };

// The boundary of a selection: the k best keys are every key above it and `take` of the keys in it.
template <typename Key>
struct Boundary {
  int shift = 0;        // keys whose bits from `shift` up equal prefix's are in the boundary
  Key prefix = 0;
  bool none = true;     // k == 0: every key is below
  bool exact = false;   // the boundary holds one key value: take its first `take` keys in flat order
  int64_t take = 0;
  int64_t count = 0;    // keys in the boundary
  std::vector<int64_t> per_block;  // exact: how many each block takes; else how many each block has

  // Branch-free place of an eligible-or-not key (ineligible keys are below everything).
  inline uint8_t place(Key key) const {
    const Key high = Key(key >> shift);
    const Key bound = Key(prefix >> shift);
    const uint8_t eligible = (key != Key(kIneligibleKey)) & !none;
    return uint8_t(eligible * (uint8_t(high == bound) + 2 * uint8_t(high > bound)));
  }
};

// Histogram passes of one radix selection over a Layout (see the file comment). Usage:
//   Selector<Key> selector(layout);
//   selector.count(source);                // first digit; eligible() is known from here
//   selector.aim(k);                       // k <= eligible()
//   while (!selector.choose()) selector.count(source);
//   ... final pass with selector.boundary()
// A Source has `void keys(int64_t part, int64_t begin, int64_t end, Key* out) const`, writing each
// position's key (kIneligibleKey for positions that may not be selected).
template <typename Key>
class Selector {
 public:
  explicit Selector(const Layout& layout)
      : layout_(layout),
        digit_bits_(layout.total() < (int64_t(1) << 16) ? 8 : 16),
        bins_(int64_t(1) << digit_bits_),
        stride_(bins_ + kSpareMask + 1),
        shift_(kKeyBits),
        // A boundary bin this small is settled from candidates collected in the final pass.
        candidate_limit_(std::max<int64_t>(int64_t(1) << 16, layout.total() / 256)) {}

  template <typename Source>
  void count(const Source& source) {
    shift_ -= digit_bits_;
    const Key high_mask = shift_ + digit_bits_ >= kKeyBits ? Key(0) : Key(~uint64_t(0) << (shift_ + digit_bits_));
    histograms_.assign(layout_.blocks() * stride_, 0);
    layout_.for_each_chunk([&](int64_t block, int64_t part, int64_t begin, int64_t end) {
      Key keys[kChunk];
      source.keys(part, begin, end, keys);
      count_digits(keys, end - begin, shift_, high_mask, boundary_.prefix, bins_ - 1,
                   histograms_.data() + block * stride_);
    });
    totals_.assign(bins_, 0);
    for (int64_t block = 0; block < layout_.blocks(); ++block) {
      for (int64_t bin = 0; bin < bins_; ++bin) totals_[bin] += histograms_[block * stride_ + bin];
    }
    if (eligible_ < 0) {
      eligible_ = 0;
      for (int64_t t : totals_) eligible_ += t;
    }
  }

  // Eligible keys (known after the first count).
  int64_t eligible() const { return eligible_; }

  void aim(int64_t k) {
    TORCH_INTERNAL_ASSERT(0 <= k && k <= eligible_, "selection of ", k, " from ", eligible_);
    remaining_ = k;
    boundary_.none = k == 0;
  }

  // Fixes the digit of the last count. True when the boundary is settled: small enough for
  // candidates, or a whole key; false when another count of the next digit is needed.
  bool choose() {
    if (boundary_.none) {
      histograms_ = {};
      totals_ = {};
      return true;
    }
    int64_t digit = bins_ - 1;
    while (totals_[digit] < remaining_) remaining_ -= totals_[digit--];
    boundary_.prefix = Key(boundary_.prefix | (Key(digit) << shift_));
    boundary_.shift = shift_;
    boundary_.count = totals_[digit];
    boundary_.take = remaining_;
    boundary_.exact = shift_ == 0;
    if (!boundary_.exact && boundary_.count > candidate_limit_) return false;
    boundary_.per_block.assign(layout_.blocks(), 0);
    int64_t left = remaining_;
    for (int64_t block = 0; block < layout_.blocks(); ++block) {
      const int64_t here = histograms_[block * stride_ + digit];
      // Exact: ties go to the lowest positions, so blocks take their share in flat order.
      boundary_.per_block[block] = boundary_.exact ? std::min(left, here) : here;
      left -= boundary_.exact ? boundary_.per_block[block] : 0;
    }
    // Settled: the counters are not needed again (a selection per layer keeps only this small state).
    histograms_ = {};
    totals_ = {};
    return true;
  }

  const Boundary<Key>& boundary() const { return boundary_; }

 private:
  static constexpr int kKeyBits = 8 * sizeof(Key);
  const Layout& layout_;
  const int digit_bits_;
  const int64_t bins_;
  const int64_t stride_;
  std::vector<uint32_t> histograms_;
  std::vector<int64_t> totals_;
  int shift_;
  const int64_t candidate_limit_;
  int64_t eligible_ = -1;
  int64_t remaining_ = 0;
  Boundary<Key> boundary_;
};

// Boundary keys met by a final pass that is not exact, per block in flat order.
template <typename Key>
struct Candidates {
  std::vector<std::vector<Key>> keys;
  std::vector<std::vector<int64_t>> parts;
  std::vector<std::vector<int64_t>> positions;

  explicit Candidates(const Boundary<Key>& boundary)
      : keys(boundary.per_block.size()), parts(keys.size()), positions(keys.size()) {
    for (size_t block = 0; block < keys.size(); ++block) {
      const int64_t expected = boundary.exact ? 0 : boundary.per_block[block];
      keys[block].reserve(expected);
      parts[block].reserve(expected);
      positions[block].reserve(expected);
    }
  }

  void add(int64_t block, Key key, int64_t part, int64_t position) {
    keys[block].push_back(key);
    parts[block].push_back(part);
    positions[block].push_back(position);
  }

  // Calls taken(part, position, is_taken) for every candidate: the `take` largest keys, equal keys
  // to the lower flat position (the order they were met in).
  template <typename Visit>
  void settle(int64_t take, const Visit& visit) const {
    std::vector<Key> all;
    for (const auto& block : keys) all.insert(all.end(), block.begin(), block.end());
    if (all.empty()) return;  // an exact boundary collects none
    TORCH_INTERNAL_ASSERT(take <= static_cast<int64_t>(all.size()), "taking ", take, " of ", all.size());
    Key threshold = std::numeric_limits<Key>::max();
    int64_t equal_to_take = 0;
    if (take > 0) {
      std::vector<Key> order(all);
      std::nth_element(order.begin(), order.begin() + (take - 1), order.end(), std::greater<Key>());
      threshold = order[take - 1];
      int64_t above = 0;
      for (Key key : all) above += key > threshold;
      equal_to_take = take - above;
    }
    for (size_t block = 0; block < keys.size(); ++block) {
      for (size_t i = 0; i < keys[block].size(); ++i) {
        const Key key = keys[block][i];
        bool taken = take > 0 && key > threshold;
        if (take > 0 && key == threshold && equal_to_take > 0) {
          taken = true;
          --equal_to_take;
        }
        visit(parts[block][i], positions[block][i], taken);
      }
    }
  }
};

// Settles boundary keys of an exact boundary in flat order: each block takes its share.
class TieBudget {
 public:
  template <typename Key>
  explicit TieBudget(const Boundary<Key>& boundary)
      : left_(boundary.exact ? boundary.per_block : std::vector<int64_t>(boundary.per_block.size(), 0)) {}

  bool take(int64_t block) {
    if (left_[block] == 0) return false;
    --left_[block];
    return true;
  }

 private:
  std::vector<int64_t> left_;
};

// Runs work(segment) for every segment of the given sizes, each exactly once. Segments of at least
// a 1/(2 * threads) share of all positions run one after another, each on every thread (their passes
// are parallel); the rest run side by side, one per thread, largest first, each on the thread that
// takes it (their passes then run inline: at::parallel_for does not nest).
template <typename Work>
void for_each_segment(const std::vector<int64_t>& sizes, const Work& work) {
  int64_t total = 0;
  for (int64_t size : sizes) total += size;
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> small;
  for (int64_t s = 0; s < static_cast<int64_t>(sizes.size()); ++s) {
    if (threads == 1 || sizes.size() == 1 || sizes[s] * 2 * threads >= total) {
      work(s);
    } else {
      small.push_back(s);
    }
  }
  std::stable_sort(small.begin(), small.end(), [&](int64_t a, int64_t b) { return sizes[a] > sizes[b]; });
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (size_t i = next++; i < small.size(); i = next++) work(small[i]);
  });
}

}  // namespace sparsekern::cpu
