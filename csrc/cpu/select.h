// Exact top-k selection over a virtual concatenation of arrays by radix select, shared by the CPU
// kernels of topk_mask and prune_grow.
//
// The rule (sparsekern/ops/reference.py): larger score first; NaN below every number; +0.0 equals -0.0;
// equal scores go to the lower flat position. Each score becomes an unsigned key whose integer order
// is that rule's order among values, so selecting the k best is finding the key of the k-th best (the
// cutoff) digit by digit from histograms, then taking every key above it plus the first entries
// equal to it in flat order. Each histogram pass reads the scores once, in parallel over blocks of
// positions; nothing is sorted.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
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
// not be selected at all (callers' eligibility), 1 a NaN (ranks below every number but may be taken).
constexpr uint64_t kIneligibleKey = 0;
constexpr uint64_t kNaNKey = 1;

// Order-preserving key of a score: flipping the sign bit of a positive float and every bit of a
// negative one makes unsigned integer order equal float order.
template <typename scalar_t>
inline typename KeyTraits<scalar_t>::Key score_key(scalar_t score) {
  using Key = typename KeyTraits<scalar_t>::Key;
  constexpr int kTopBit = 8 * sizeof(Key) - 1;
  constexpr Key sign = Key(Key(1) << kTopBit);
  Key bits;
  std::memcpy(&bits, &score, sizeof(Key));
  const Key magnitude = Key(bits & Key(~sign));
  // -0.0 becomes +0.0, so the two tie and fall to the lower position like any equal scores.
  bits = magnitude == 0 ? Key(0) : bits;
  // Written without branches so that loops over keys vectorize.
  const Key flip = Key(Key(0 - Key(bits >> kTopBit)) | sign);
  return magnitude > KeyTraits<scalar_t>::kInfinity ? Key(kNaNKey) : Key(bits ^ flip);
}

// Positions [begin, end) of array `part`, at most 2^15 of them: the unit of work and of tie bookkeeping.
struct Span {
  int64_t part;
  int64_t begin;
  int64_t end;
};

// The flat order over arrays of the given sizes, cut into spans, with the spans grouped into
// contiguous blocks of about equal length, one block per thread.
class Layout {
 public:
  explicit Layout(const std::vector<int64_t>& part_sizes) {
    for (int64_t part = 0; part < static_cast<int64_t>(part_sizes.size()); ++part) {
      for (int64_t begin = 0; begin < part_sizes[part]; begin += kSpanSize) {
        spans_.push_back({part, begin, std::min(part_sizes[part], begin + kSpanSize)});
      }
      total_ += part_sizes[part];
    }
    // At least one block per thread, and few enough positions per block for 32-bit counts.
    const int64_t blocks = std::max(std::clamp<int64_t>(total_ / kMinBlockSize, 1, at::get_num_threads()),
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
  const std::vector<Span>& spans() const { return spans_; }

  // Calls work(block, span_index, span) for every span, blocks in parallel.
  template <typename Work>
  void for_each_span(const Work& work) const {
    at::parallel_for(0, blocks(), 1, [&](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        for (size_t s = block_begin_[block]; s < block_begin_[block + 1]; ++s) work(block, s, spans_[s]);
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

// Selected = every key above `key`, plus the first `equal_taken` keys equal to it in flat order.
template <typename Key>
struct Cutoff {
  Key key;
  int64_t equal_taken;
};

// Spare histogram bins past the last digit's, for keys that do not count.
constexpr int64_t kSpareMask = 15;

// Adds one to histogram[digit] for every eligible key in [begin, end) that starts with `prefix` (the
// bits under high_mask), where digit = (key >> shift) & digit_mask. Arguments by value: the compiler
// then knows that the increments change none of them.
template <typename KeyAt, typename Key>
void count_digits(const KeyAt key_at, const int64_t begin, const int64_t end, const int shift,
                  const Key high_mask, const Key prefix, const int64_t digit_mask, uint32_t* histogram) {
  if (high_mask == 0) {
    // The first digit: every eligible key counts. Ineligible ones (never taken) go to spare bins
    // past the histogram, in turn, rather than through a branch that mispredicts or into one bin
    // that every increment would have to wait for.
    for (int64_t i = begin; i < end; ++i) {
      const Key key = key_at(i);
      // A bit mask rather than ?: which compilers turn back into a branch.
      const int64_t eligible = -static_cast<int64_t>(key != Key(kIneligibleKey));
      const int64_t digit = static_cast<int64_t>(key >> shift) & digit_mask;
      ++histogram[(digit & eligible) | ((digit_mask + 1 + (i & kSpareMask)) & ~eligible)];
    }
    return;
  }
  // Later digits: few keys share the prefix, so test a group at once in a loop that vectorizes
  // (bitwise &, no branch) and count one by one only in groups with a match.
  const auto counts = [&](Key key) { return (key != Key(kIneligibleKey)) & ((key & high_mask) == prefix); };
  const auto count_each = [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const Key key = key_at(i);
      if (counts(key)) ++histogram[(key >> shift) & digit_mask];
    }
  };
  constexpr int64_t kGroup = 32;
  int64_t i = begin;
  for (; i + kGroup <= end; i += kGroup) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t j = 0; j < kGroup; ++j) any |= counts(key_at(i + j));
    if (any) count_each(i, i + kGroup);
  }
  count_each(i, end);
}

// The cutoff of the k best keys. A Source has a `Key` type and `reader(part)`, a callable giving the
// key at a position of that part. Requires k <= the number of eligible (nonzero-key) entries.
template <typename Source>
Cutoff<typename Source::Key> find_cutoff(const Source& source, const Layout& layout, int64_t k) {
  using Key = typename Source::Key;
  constexpr int kKeyBits = 8 * sizeof(Key);
  TORCH_INTERNAL_ASSERT(0 <= k && k <= layout.total(), "selection of ", k, " from ", layout.total());
  if (k == 0) return {std::numeric_limits<Key>::max(), 0};
  // 16-bit digits need half the passes of 8-bit ones, but their histograms cost more to clear than
  // a small input costs to read.
  const int digit_bits = layout.total() < (int64_t(1) << 16) ? 8 : 16;
  const int64_t bins = int64_t(1) << digit_bits;
  const int64_t stride = bins + kSpareMask + 1;
  std::vector<uint32_t> histograms(layout.blocks() * stride);
  Key prefix = 0;         // the cutoff's digits found so far, higher bits first
  int64_t remaining = k;  // how many to take among the keys that start with `prefix`
  for (int shift = kKeyBits - digit_bits; shift >= 0; shift -= digit_bits) {
    const Key high_mask = shift + digit_bits >= 64 ? Key(0) : Key(~uint64_t(0) << (shift + digit_bits));
    std::fill(histograms.begin(), histograms.end(), 0);
    layout.for_each_span([&](int64_t block, size_t, const Span& span) {
      count_digits(source.reader(span.part), span.begin, span.end, shift, high_mask, prefix, bins - 1,
                   histograms.data() + block * stride);
    });
    std::vector<int64_t> totals(histograms.begin(), histograms.begin() + bins);
    for (int64_t block = 1; block < layout.blocks(); ++block) {
      for (int64_t bin = 0; bin < bins; ++bin) totals[bin] += histograms[block * stride + bin];
    }
    int64_t digit = bins - 1;
    while (totals[digit] < remaining) remaining -= totals[digit--];
    prefix = Key(prefix | (Key(digit) << shift));
  }
  return {prefix, remaining};
}

// Sets selected[i] = key > threshold over [begin, end); returns how many keys equal the threshold.
template <typename KeyAt, typename Key>
int64_t mark_above(const KeyAt key_at, const int64_t begin, const int64_t end, const Key threshold,
                   bool* selected) {
  int32_t equal = 0;  // a span is short; a narrow counter lets the loop vectorize
  for (int64_t i = begin; i < end; ++i) {
    const Key key = key_at(i);
    selected[i] = key > threshold;
    equal += key == threshold;
  }
  return equal;
}

// Writes out[part][i] = whether position i of `part` is selected under `cutoff`.
template <typename Source>
void write_selection(const Source& source, const Layout& layout, Cutoff<typename Source::Key> cutoff,
                     const std::vector<bool*>& out) {
  using Key = typename Source::Key;
  const Key threshold = cutoff.key;
  std::vector<int64_t> equal_counts(layout.spans().size());
  layout.for_each_span([&](int64_t, size_t s, const Span& span) {
    equal_counts[s] = mark_above(source.reader(span.part), span.begin, span.end, threshold, out[span.part]);
  });
  // Ties at the cutoff go to the lowest positions: give each span its share in flat order, then
  // revisit only the spans with a share (usually one).
  std::vector<std::pair<size_t, int64_t>> shares;
  int64_t left = cutoff.equal_taken;
  for (size_t s = 0; s < equal_counts.size() && left > 0; ++s) {
    const int64_t take = std::min(left, equal_counts[s]);
    if (take > 0) shares.emplace_back(s, take);
    left -= take;
  }
  at::parallel_for(0, static_cast<int64_t>(shares.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      const Span& span = layout.spans()[shares[j].first];
      const auto key_at = source.reader(span.part);
      bool* selected = out[span.part];
      int64_t take = shares[j].second;
      for (int64_t i = span.begin; take > 0; ++i) {
        if (key_at(i) == threshold) {
          selected[i] = true;
          --take;
        }
      }
    }
  });
}

}  // namespace sparsekern::cpu
