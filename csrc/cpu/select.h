// Exact top-k selection over a virtual concatenation of arrays, shared by the CPU kernels of
// topk_mask and prune_grow.
//
// The rule (sparsekern/ops/reference.py): larger score first; NaN below every number; +0.0 equals -0.0;
// equal scores go to the lower flat position. Each score becomes an unsigned key whose integer order
// is that rule's order among values, so a selection of the k best is a Threshold: every key above
// one key value, and the keys equal to it up to one flat position. ThresholdSearch finds it (a
// sample, then one read-only pass; radix select when that is not enough), and the kernels' final
// pass applies it to each key. Nothing is sorted.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

  // The same for |score|, in fewer operations: the magnitude with the sign bit set.
  inline Key magnitude_key(Key bits) const {
    const Key magnitude = Key(bits & Key(~kSign));
    return magnitude > KeyTraits<scalar_t>::kInfinity ? nan_key : Key(magnitude | kSign);
  }

  bool absolute() const { return abs_mask != Key(~Key(0)); }

  // keys[i] = key of bits[i] where eligible[i] (a byte compared with `wanted`), else kIneligibleKey.
  template <bool kAbsolute>
  inline void keys(const Key* __restrict bits, const uint8_t* __restrict flags, uint8_t wanted_nonzero,
                   int64_t size, Key* __restrict out) const {
    const KeyRule local = *this;  // a local copy keeps the loop free of reloads
    for (int64_t i = 0; i < size; ++i) {
      const Key eligible = Key(Key(0) - Key(uint8_t(flags[i] != 0) == wanted_nonzero));
      out[i] = Key((kAbsolute ? local.magnitude_key(bits[i]) : local(bits[i])) & eligible);
    }
  }
};

// Positions [begin, end) of array `part`, at most 2^15 of them: the unit of work.
struct Span {
  int64_t part;
  int64_t begin;
  int64_t end;
  int64_t first_chunk;  // index of its first chunk in the whole layout
};

// Positions a pass handles at once: their keys and flags fit in L1.
constexpr int64_t kChunk = 1024;

// The flat order over arrays of the given sizes, cut into spans, with the spans grouped into
// contiguous blocks of about equal length: one block per thread, or a single block when the
// caller already runs in a parallel region (one selection per thread).
class Layout {
 public:
  explicit Layout(const std::vector<int64_t>& part_sizes) {
    int64_t chunks = 0;
    for (int64_t part = 0; part < static_cast<int64_t>(part_sizes.size()); ++part) {
      offsets_.push_back(total_);
      sizes_.push_back(part_sizes[part]);
      for (int64_t begin = 0; begin < part_sizes[part]; begin += kSpanSize) {
        const int64_t end = std::min(part_sizes[part], begin + kSpanSize);
        spans_.push_back({part, begin, end, chunks});
        chunks += (end - begin + kChunk - 1) / kChunk;
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
  int64_t size(int64_t part) const { return sizes_[part]; }
  int64_t blocks() const { return static_cast<int64_t>(block_begin_.size()) - 1; }
  // Flat position of position 0 of `part`.
  int64_t offset(int64_t part) const { return offsets_[part]; }
  // The part holding a flat position.
  int64_t part_of(int64_t position) const {
    // The last part starting at or before the position (empty parts share an offset with the next).
    return static_cast<int64_t>(std::upper_bound(offsets_.begin(), offsets_.end(), position) - offsets_.begin()) - 1;
  }

  // Calls work(block, part, begin, end) for every chunk of at most kChunk positions, blocks in
  // parallel, the chunks of a block in flat order; with `every` > 1 only for one chunk in `every`.
  template <typename Work>
  void for_each_chunk(const Work& work, int64_t every = 1) const {
    at::parallel_for(0, blocks(), 1, [&](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        for (size_t s = block_begin_[block]; s < block_begin_[block + 1]; ++s) {
          const Span& span = spans_[s];
          for (int64_t begin = span.begin, chunk = span.first_chunk; begin < span.end; begin += kChunk, ++chunk) {
            if (chunk % every == 0) work(block, span.part, begin, std::min(span.end, begin + kChunk));
          }
        }
      }
    });
  }

 private:
  static constexpr int64_t kSpanSize = int64_t(1) << 15;
  static constexpr int64_t kMinBlockSize = int64_t(1) << 15;
  static constexpr int64_t kMaxBlockSize = int64_t(1) << 31;
  std::vector<Span> spans_;
  std::vector<size_t> block_begin_;
  std::vector<int64_t> offsets_;
  std::vector<int64_t> sizes_;
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

// Calls visit(i) for every i < size with flags[i] != 0 (flags are 0 or 1), in order, at a cost of
// about one instruction per 16 flags plus one per flag set: collections of a few keys in many.
template <typename Visit>
inline void for_each_flagged(const uint8_t* flags, int64_t size, const Visit& visit) {
  int64_t i = 0;
#if defined(__SSE2__)
  for (; i + 16 <= size; i += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(flags + i));
    unsigned bits = static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpgt_epi8(bytes, _mm_setzero_si128())));
    while (bits != 0) {
      visit(i + __builtin_ctz(bits));
      bits &= bits - 1;
    }
  }
#endif
  for (; i < size; ++i) {
    if (flags[i]) visit(i);
  }
}

// An exact selection: every key above `key`, and the keys equal to it up to flat position
// `tie_position` (inclusive). Ineligible keys are never taken.
template <typename Key>
struct Threshold {
  Key key = std::numeric_limits<Key>::max();
  int64_t tie_position = -1;
  bool none = true;  // nothing is taken (k == 0)

  // Writes taken[i] for the keys of flat positions [first, first + size).
  inline void apply(const Key* __restrict keys, int64_t first, int64_t size, uint8_t* __restrict taken) const {
    const Key threshold = key;
    const Key active = !none;
    // Ties at i < tie_limit are taken. Indices as wide as the keys (a chunk fits), so that the loop
    // vectorizes.
    const Key tie_limit = Key(std::clamp<int64_t>(tie_position + 1 - first, 0, size));
    for (Key i = 0; i < Key(size); ++i) {
      const Key k = keys[i];
      taken[i] = uint8_t(active & Key(k != Key(kIneligibleKey)) &
                         (Key(k > threshold) | (Key(k == threshold) & Key(i < tie_limit))));
    }
  }
};

// How many keys a selection takes: `count`, or all eligible keys but `count` (prune_grow's keep step,
// whose eligible count is found as it goes).
struct Target {
  int64_t count;
  bool complement;
  int64_t k(int64_t eligible) const { return complement ? eligible - count : count; }
};

// Finds the Threshold of a selection among the keys of a Source over a Layout; a Source has
// `void keys(int64_t part, int64_t begin, int64_t end, Key* out) const` writing each position's key
// (kIneligibleKey where it may not be selected).
//
// The usual way, two reads: histograms of a sample of the keys (one chunk in up to 64; every chunk
// of a small layout) predict a window, a range of keys that holds the k-th best with a margin; one
// read-only pass (`scan`) counts the eligible keys and those above the window, and collects the few
// inside it; `finish` settles the threshold among them. That pass costs a compare per key, where a
// histogram costs a memory increment (~1 ns). One key value held by many (ties: the zeros of
// just-grown weights) is counted per chunk instead of collected. If the window missed, `finish`
// narrows by full histograms digit by digit (radix select).
template <typename Key>
class ThresholdSearch {
 public:
  explicit ThresholdSearch(const Layout& layout)
      : layout_(layout),
        every_(sampling_stride(layout.total())),
        digit_bits_(digit_bits(layout.total() / every_)),
        limit_(std::max<int64_t>(int64_t(1) << 10, layout.total() / 64)) {}

  // Reads every key once and returns how many are eligible. `eligible_hint` (< 0: unknown) sharpens
  // the window. For every chunk it calls mark(part, begin, size, above), above[i] = 1 where the
  // key is above the window: those are taken if the threshold is settled in the window
  // (settled_in_window()), the usual case, so callers write them as they go. finish() may be called
  // once the caller checked 0 <= target.k(eligible) <= eligible.
  template <typename Source, typename Mark>
  int64_t scan(const Source& source, Target target, int64_t eligible_hint, const Mark& mark) {
    target_ = target;
    window_ = predict(source, eligible_hint);
    collect(source, mark);
    return eligible_;
  }

  // The threshold. `source` reads the keys again where needed; `fresh`, used only when the window
  // missed, must give them as scan() saw them whatever scan()'s marks changed (default: `source`).
  template <typename Source, typename Fresh = Source>
  Threshold<Key> finish(const Source& source, const Fresh* fresh = nullptr) {
    const int64_t k = target_.k(eligible_);
    TORCH_INTERNAL_ASSERT(0 <= k && k <= eligible_, "selection of ", k, " from ", eligible_);
    Threshold<Key> found;
    // Nothing to take: settled, unless scan() marked keys above its window (it aimed by an estimate).
    settled_in_window_ = k == 0 ? above_ == 0 : settle(source, k, &found);
    if (settled_in_window_ || k == 0) return found;
    if constexpr (std::is_same_v<Fresh, Source>) {
      if (fresh == nullptr) return narrow(source, k);
    }
    return narrow(*fresh, k);
  }

  // Whether finish() settled the threshold in scan()'s window: then the keys scan() marked above it
  // are exactly the taken keys outside it, and visit_taken_in_window() gives the rest.
  bool settled_in_window() const { return settled_in_window_; }

  // Calls visit(part, position) for every key in the window that `threshold` takes.
  template <typename Source, typename Visit>
  void visit_taken_in_window(const Source& source, const Threshold<Key>& threshold, const Visit& visit) const {
    if (threshold.none || window_.empty()) return;
    for (size_t block = 0; block < keys_.size(); ++block) {
      for (size_t i = 0; i < keys_[block].size(); ++i) {
        const Key key = keys_[block][i];
        const int64_t position = positions_[block][i];
        if (key > threshold.key || (key == threshold.key && position <= threshold.tie_position)) {
          const int64_t part = layout_.part_of(position);
          visit(part, position - layout_.offset(part));
        }
      }
    }
    // The heavy key's entries: all taken when it is above the threshold, the first ones when it is it.
    if (!window_.has_heavy || window_.heavy < threshold.key) return;
    const int64_t last = window_.heavy > threshold.key ? layout_.total() : threshold.tie_position;
    for (const auto& block : heavy_chunks_) {
      for (const auto& [part, begin, count] : block) {
        const int64_t first = layout_.offset(part) + begin;
        if (first > last) return;
        const int64_t end = std::min(begin + kChunk, layout_.size(part));
        Key chunk[kChunk];
        source.keys(part, begin, end, chunk);
        for (int64_t i = 0; i < end - begin && first + i <= last; ++i) {
          if (chunk[i] == window_.heavy) visit(part, begin + i);
        }
      }
    }
  }

 private:
  static constexpr int kKeyBits = 8 * sizeof(Key);
  static constexpr Key kMaxKey = std::numeric_limits<Key>::max();

  // Keys in [bottom, top]; empty when bottom > top. The keys equal to `heavy` (when has_heavy: one
  // key value held by many, such as the zeros of just-grown weights) are counted per chunk rather
  // than collected.
  struct Window {
    Key bottom = 1;
    Key top = 0;
    bool has_heavy = false;
    Key heavy = 0;
    bool empty() const { return bottom > top; }
  };

  // One chunk in how many the sample reads: all of a layout under 2^15 positions (the window is then
  // exact), else at least 16K positions and one chunk in 64 at most. The window's width in keys
  // grows as the square root of the stride; the sample's cost shrinks as the stride.
  static int64_t sampling_stride(int64_t total) {
    int64_t every = 1;
    while (every < 64 && total / (every * 2) >= (int64_t(1) << 14)) every *= 2;
    return every;
  }

  // Bits per digit: histograms about as large as the sample they count (clearing and scanning 64K
  // bins for a small layer would cost more than reading it); windows too wide are refined.
  static int digit_bits(int64_t sampled) {
    return std::min<int>(kKeyBits, sampled >= (int64_t(1) << 16) ? 16 : sampled >= (int64_t(1) << 11) ? 12 : 8);
  }

  // Counts of the eligible keys whose bits from `fixed` up are prefix's, by their digit: the bits
  // from `shift` up to `fixed`, over one chunk in `every`; *positions gets the positions read.
  template <typename Source>
  std::vector<int64_t> histogram(const Source& source, int shift, int fixed, Key prefix, int64_t every,
                                 int64_t* positions = nullptr) const {
    const Key high_mask = fixed >= kKeyBits ? Key(0) : Key(~uint64_t(0) << fixed);
    const int64_t bins = int64_t(1) << (fixed - shift);
    const int64_t stride = bins + kSpareMask + 1;
    std::vector<uint32_t> counts(layout_.blocks() * stride, 0);
    layout_.for_each_chunk([&](int64_t block, int64_t part, int64_t begin, int64_t end) {
      Key keys[kChunk];
      source.keys(part, begin, end, keys);
      count_digits(keys, end - begin, shift, high_mask, Key(prefix & high_mask), bins - 1,
                   counts.data() + block * stride);
    }, every);
    std::vector<int64_t> totals(bins, 0);
    int64_t spare = 0;
    for (int64_t block = 0; block < layout_.blocks(); ++block) {
      for (int64_t bin = 0; bin < bins; ++bin) totals[bin] += counts[block * stride + bin];
      for (int64_t bin = bins; bin < stride; ++bin) spare += counts[block * stride + bin];
    }
    if (positions) {
      *positions = spare;
      for (int64_t count : totals) *positions += count;
    }
    return totals;
  }

  // The next digit below bit `fixed`: its lowest bit.
  int next_shift(int fixed) const { return std::max(0, fixed - digit_bits_); }

  // The window the sample predicts; empty when it cannot (nothing eligible sampled).
  template <typename Source>
  Window predict(const Source& source, int64_t eligible_hint) const {
    int64_t positions = 0;
    int fixed = kKeyBits;
    int shift = next_shift(fixed);
    std::vector<int64_t> sample = histogram(source, shift, fixed, Key(0), every_, &positions);
    int64_t sampled = 0;
    for (int64_t count : sample) sampled += count;
    if (sampled == 0) return {};
    const double eligible = eligible_hint >= 0 ? double(eligible_hint)
                                               : double(sampled) * double(layout_.total()) / double(positions);
    // The expected number of sampled keys among the k best, and a margin of a few of its standard
    // deviations (none when the sample is everything).
    double rank = double(target_.k(int64_t(std::llround(eligible)))) * double(sampled) / std::max(eligible, 1.0);
    // The sampled count above a fixed key is about binomial: 4 standard deviations, and a few keys
    // for the estimate of `eligible` and for chunks that are not independent draws.
    const double share = std::clamp(rank / double(sampled), 0.0, 1.0);
    const double margin = every_ == 1 ? 0.0 : 4.0 * std::sqrt(rank * (1.0 - share) + 1.0) + 16.0;
    Key prefix = 0;  // bits above the current digit, fixed while refining
    Key top = kMaxKey;  // the window's top: set by the first digit, kept while refining its bottom
    for (;;) {
      // Digits from the one holding the (rank - margin)-th best sampled key down to the one holding
      // the (rank + margin)-th; `middle` holds the rank-th.
      const int64_t bins = static_cast<int64_t>(sample.size());
      int64_t above = 0, high = -1, middle = -1, low = 0, above_middle = 0;
      for (int64_t digit = bins - 1; digit >= 0; --digit) {
        if (high < 0 && double(above + sample[digit]) >= rank - margin) high = digit;
        if (middle < 0 && double(above + sample[digit]) >= rank) {
          middle = digit;
          above_middle = above;
        }
        above += sample[digit];
        if (double(above) >= rank + margin) {
          low = digit;
          break;
        }
      }
      if (high < 0) return {};
      if (middle < 0) middle = low;
      // A digit holding more sampled keys than the margin spans (a digit of equal keys, such as the
      // zeros of just-grown weights, may hold a third of a layout) is left out of the window, unless
      // it holds the rank-th key: then the window is refined within it.
      const double heavy = every_ == 1 ? double(limit_) : std::max(64.0, 2.0 * margin + 1.0);
      for (int64_t digit = low; digit < middle; ++digit) {
        if (double(sample[digit]) > heavy) low = digit + 1;
      }
      for (int64_t digit = middle + 1; digit <= high; ++digit) {
        if (double(sample[digit]) > heavy) {
          high = digit - 1;
          break;
        }
      }
      const bool too_many = double(sample[middle]) > heavy;
      const Key low_bits = Key(Key(Key(1) << shift) - 1);  // bits below the digit
      const auto bottom_of = [&](int64_t digit) { return Key(prefix | Key(Key(digit) << shift)); };
      const auto top_of = [&](int64_t digit) { return Key(bottom_of(digit) | low_bits); };
      if (fixed == kKeyBits) top = top_of(high);
      if (!too_many) return {bottom_of(low), top};
      // The middle digit alone holds too many: one key, counted rather than collected, or refined by
      // the next digit, within the sample.
      if (shift == 0) return {bottom_of(middle), top, true, bottom_of(middle)};
      prefix = bottom_of(middle);
      rank -= double(above_middle);
      fixed = shift;
      shift = next_shift(fixed);
      sample = histogram(source, shift, fixed, prefix, every_);
    }
  }

  // One pass over every key: counts eligible keys and those above the window, and collects those
  // inside it in flat order (a one-key window: counts them per chunk); mark() as scan() says.
  template <typename Source, typename Mark>
  void collect(const Source& source, const Mark& mark) {
    const int64_t blocks = layout_.blocks();
    std::vector<int64_t> eligible(blocks, 0), above(blocks, 0);
    keys_.assign(blocks, {});
    positions_.assign(blocks, {});
    heavy_chunks_.assign(blocks, {});
    const Window window = window_;
    layout_.for_each_chunk([&](int64_t block, int64_t part, int64_t begin, int64_t end) {
      Key chunk[kChunk];
      uint8_t inside[kChunk], is_above[kChunk];
      source.keys(part, begin, end, chunk);
      const int64_t size = end - begin;
      const Key* __restrict keys = chunk;
      uint8_t* __restrict in = inside;
      uint8_t* __restrict up = is_above;
      // An empty window takes every eligible key: only counting is wanted then.
      const Key bottom = window.bottom, width = Key(window.top - window.bottom), top = window.empty() ? kMaxKey : window.top;
      // The heavy key, or a key no eligible key equals.
      const Key heavy = window.has_heavy ? window.heavy : Key(kIneligibleKey);
      // Counters as wide as the keys, so that the loop vectorizes (a chunk fits in 16 bits).
      Key counted = 0, over = 0, in_count = 0, heavy_count = 0;
      for (int64_t i = 0; i < size; ++i) {
        const Key key = keys[i];
        const Key valid = key != Key(kIneligibleKey);
        const Key is_heavy = valid & Key(key == heavy);
        const Key is_in = valid & Key(Key(key - bottom) <= width) & (is_heavy ^ 1);  // bottom <= key <= top
        const Key is_over = valid & Key(key > top);
        counted += valid;
        over += is_over;
        in_count += is_in;
        heavy_count += is_heavy;
        in[i] = uint8_t(is_in);
        up[i] = uint8_t(is_over);
      }
      eligible[block] += counted;
      mark(part, begin, size, static_cast<const uint8_t*>(is_above));
      if (window.empty()) return;
      above[block] += over;
      if (heavy_count != 0) heavy_chunks_[block].push_back({part, begin, int64_t(heavy_count)});
      if (in_count == 0) return;
      const int64_t first = layout_.offset(part) + begin;
      for_each_flagged(inside, size, [&](int64_t i) {
        keys_[block].push_back(chunk[i]);
        positions_[block].push_back(first + i);
      });
    });
    eligible_ = above_ = 0;
    for (int64_t block = 0; block < blocks; ++block) {
      eligible_ += eligible[block];
      above_ += above[block];
    }
  }

  // Settles the threshold from what collect() found, when the k-th best key is in the window.
  template <typename Source>
  bool settle(const Source& source, int64_t k, Threshold<Key>* found) const {
    if (window_.empty()) return false;
    std::vector<Key> order;
    for (const auto& block : keys_) order.insert(order.end(), block.begin(), block.end());
    int64_t heavy = 0;
    for (const auto& block : heavy_chunks_) {
      for (const auto& chunk : block) heavy += chunk[2];
    }
    const int64_t collected = static_cast<int64_t>(order.size());
    int64_t take = k - above_;
    if (take < 0 || take > collected + heavy) return false;
    found->none = false;
    found->tie_position = -1;
    if (take == 0) {  // every key above the window, none in it
      found->key = window_.top;
      return true;
    }
    // Collected keys above the heavy one come first, then its entries, then collected keys below it.
    int64_t above_heavy = collected;
    if (window_.has_heavy) {
      above_heavy = 0;
      for (Key key : order) above_heavy += key > window_.heavy;
      if (take > above_heavy && take <= above_heavy + heavy) {
        found->key = window_.heavy;
        found->tie_position = nth_heavy(source, take - above_heavy);
        return true;
      }
      if (take > above_heavy) take -= heavy;  // every heavy entry is taken too
    }
    std::nth_element(order.begin(), order.begin() + (take - 1), order.end(), std::greater<Key>());
    found->key = order[take - 1];
    int64_t ties = take;
    for (Key key : order) ties -= key > found->key;
    // The keys were collected in flat order: the ties taken are the first `ties` of them.
    for (size_t block = 0; block < keys_.size() && ties > 0; ++block) {
      for (size_t i = 0; i < keys_[block].size() && ties > 0; ++i) {
        if (keys_[block][i] == found->key && --ties == 0) found->tie_position = positions_[block][i];
      }
    }
    return true;
  }

  // Flat position of the n-th entry of the heavy key, from collect()'s chunk counts.
  template <typename Source>
  int64_t nth_heavy(const Source& source, int64_t n) const {
    for (const auto& block : heavy_chunks_) {
      for (const auto& [part, begin, count] : block) {
        if (count < n) {
          n -= count;
          continue;
        }
        const int64_t end = std::min(begin + kChunk, layout_.size(part));
        Key chunk[kChunk];
        source.keys(part, begin, end, chunk);
        for (int64_t i = 0; i < end - begin; ++i) {
          if (chunk[i] == window_.heavy && --n == 0) return layout_.offset(part) + begin + i;
        }
      }
    }
    TORCH_INTERNAL_ASSERT(false, "fewer entries of the heavy key than counted");
    return -1;
  }

  // Radix select, when the predicted window missed: fixes digits from the top by full histograms
  // until the keys sharing the prefix are few enough to collect, or the prefix is a whole key.
  template <typename Source>
  Threshold<Key> narrow(const Source& source, int64_t k) {
    Key bottom = 0, top = kMaxKey;
    int64_t remaining = k;
    for (int fixed = kKeyBits, shift = next_shift(fixed);; fixed = shift, shift = next_shift(fixed)) {
      const std::vector<int64_t> counts = histogram(source, shift, fixed, bottom, 1);
      int64_t digit = static_cast<int64_t>(counts.size()) - 1;
      while (counts[digit] < remaining) remaining -= counts[digit--];
      bottom = Key(bottom | Key(Key(digit) << shift));
      top = Key(bottom | Key(Key(Key(1) << shift) - 1));
      if (shift == 0 || counts[digit] <= limit_) {
        window_ = shift == 0 ? Window{bottom, top, true, bottom} : Window{bottom, top};
        collect(source, [](int64_t, int64_t, int64_t, const uint8_t*) {});
        Threshold<Key> found;
        TORCH_INTERNAL_ASSERT(settle(source, k, &found), "radix select lost its keys");
        return found;
      }
    }
  }

  const Layout& layout_;
  const int64_t every_;
  const int digit_bits_;
  const int64_t limit_;
  Target target_{0, false};
  Window window_;
  bool settled_in_window_ = false;
  int64_t eligible_ = 0;
  int64_t above_ = 0;
  std::vector<std::vector<Key>> keys_;
  std::vector<std::vector<int64_t>> positions_;
  std::vector<std::vector<std::array<int64_t, 3>>> heavy_chunks_;  // (part, begin, entries of the heavy key)
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
