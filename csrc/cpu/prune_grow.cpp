// CPU kernel of sparsekern::prune_grow over a list of layers: per segment (a layer, or the whole list)
// two radix selections (select.h) and one final pass that writes everything.
//
//   phase 1 (every segment, before anything is written): the keep selection's pass over the prune
//            scores, which counts the active entries, so n and `active` are checked, and writes
//            `kept` into the new mask where it can tell already;
//   phase 2 (per segment): the few keys the keep selection settles last; the grow selection's pass
//            over the grow scores of entries not kept, which marks the grown ones it can tell; its
//            last few; a final pass that zeroes weight, state and masked tensors off the new mask.
// Segments run in parallel, one per thread (layer scope), or one segment's passes do (global scope).
// Masks are read as bytes: any non-zero byte is True, as torch reads a bool.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cpu/columns.h"
#include "cpu/score_checks.h"
#include "cpu/select.h"

namespace sparsekern::cpu {
namespace {

struct Layer {
  int64_t numel = 0;
  Column mask, prune, grow, weight;
  std::vector<Column> state, masked;
  uint8_t* new_mask = nullptr;  // contiguous output
};

// Keys of one selection's eligible entries: the keep step takes active entries by prune score, the
// grow step entries not kept (new_mask still holds `kept` then) by grow score.
template <typename scalar_t, bool kGrow>
struct EligibleKeys {
  using Key = typename KeyTraits<scalar_t>::Key;
  const std::vector<Layer>& layers;
  const std::vector<int64_t>& parts;  // the segment's layers
  KeyRule<scalar_t> rule;

  void keys(int64_t part, int64_t begin, int64_t end, Key* __restrict out) const {
    const Layer& layer = layers[parts[part]];
    uint8_t flag_buffer[kChunk];
    Key bit_buffer[kChunk];
    const uint8_t* flags = kGrow ? layer.new_mask + begin : layer.mask.read<uint8_t>(begin, end, flag_buffer);
    const Key* bits = (kGrow ? layer.grow : layer.prune).template read<Key>(begin, end, bit_buffer);
    // Grow: eligible where not kept (new_mask holds `kept`, 0 or 1); keep: where the mask is set.
    const uint8_t wanted_nonzero = kGrow ? 0 : 1;
    if (rule.absolute()) {
      rule.template keys<true>(bits, flags, wanted_nonzero, end - begin, out);
    } else {
      rule.template keys<false>(bits, flags, wanted_nonzero, end - begin, out);
    }
  }
};

// The grow step's keys from scratch: each call first writes `kept` (the keep step's threshold applied
// to its keys) into the new mask for the positions asked, then reads the grow step's keys against
// it. For when the grow step's first pass marked grown entries in the new mask and its prediction
// missed: the keys must then be read as that pass saw them.
template <typename scalar_t>
struct KeepThenGrowKeys {
  using Key = typename KeyTraits<scalar_t>::Key;
  const std::vector<Layer>& layers;
  const std::vector<int64_t>& parts;
  const Layout& layout;
  const EligibleKeys<scalar_t, false>& keep_source;
  const EligibleKeys<scalar_t, true>& grow_source;
  const Threshold<Key>& keep;

  void keys(int64_t part, int64_t begin, int64_t end, Key* out) const {
    Key keep_keys[kChunk];
    keep_source.keys(part, begin, end, keep_keys);
    keep.apply(keep_keys, layout.offset(part) + begin, end - begin, layers[parts[part]].new_mask + begin);
    grow_source.keys(part, begin, end, out);
  }
};

// Sets values[i] to 0 where zero[i] is 1, for positions [begin, end) of a column of Bits-wide entries
// (all-zero bits are +0.0 in every float dtype). Touches only groups that change, so memory already
// zero stays clean.
template <typename Bits>
void zero_bits(const Column& column, int64_t begin, int64_t end, const uint8_t* __restrict zero) {
  Bits buffer[kChunk];
  Bits* __restrict values = column.read<Bits>(begin, end, buffer);
  constexpr int64_t kGroup = 32;
  const int64_t size = end - begin;
  bool changed = false;
  for (int64_t i = 0; i < size; i += kGroup) {
    const int64_t last = std::min(size, i + kGroup);
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t j = i; j < last; ++j) any |= zero[j] & (values[j] != 0);
    if (!any) continue;
    changed = true;
    for (int64_t j = i; j < last; ++j) values[j] = zero[j] ? Bits(0) : values[j];
  }
  if (changed) column.write(begin, end, values);
}

void zero_where(const Column& column, int64_t begin, int64_t end, const uint8_t* zero) {
  switch (column.element_size()) {
    case 2: zero_bits<uint16_t>(column, begin, end, zero); break;
    case 4: zero_bits<uint32_t>(column, begin, end, zero); break;
    case 8: zero_bits<uint64_t>(column, begin, end, zero); break;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected element size ", column.element_size());
  }
}

template <typename scalar_t>
class SegmentUpdate {
 public:
  using Key = typename KeyTraits<scalar_t>::Key;

  SegmentUpdate(const std::vector<Layer>& layers, std::vector<int64_t> parts, int64_t n, bool prune_abs,
                bool grow_abs)
      : layers_(layers),
        parts_(std::move(parts)),
        layout_(sizes()),
        n_(n),
        keep_source_{layers_, parts_, KeyRule<scalar_t>(prune_abs, kNaNKey)},
        grow_source_{layers_, parts_, KeyRule<scalar_t>(grow_abs, kNaNKey)},
        keep_(layout_) {}

  // Phase 1: reads the active entries' prune scores once, and returns how many entries are active.
  // `active_hint` (< 0: none) is the caller's count. Also writes `kept` into the new mask where it
  // can already tell (the new masks are outputs: writing them before the checks changes nothing).
  int64_t count_active(int64_t active_hint) {
    active_ = keep_.scan(keep_source_, Target{n_, true}, active_hint,
                         [&](int64_t part, int64_t begin, int64_t size, const uint8_t* above) {
                           std::memcpy(layers_[parts_[part]].new_mask + begin, above, size);
                         });
    return active_;
  }

  // Phase 2: everything else, once every segment's counts have been checked.
  void update() {
    const Threshold<Key> keep = keep_.finish(keep_source_);
    if (keep_.settled_in_window()) {
      keep_.visit_taken_in_window(keep_source_, keep, [&](int64_t part, int64_t i) { new_mask(part)[i] = 1; });
    } else {
      apply(keep_source_, keep, /*or_into=*/false);
    }
    ThresholdSearch<Key> grow(layout_);
    const int64_t eligible = grow.scan(grow_source_, Target{n_, false}, layout_.total() - (active_ - n_),
                                       [&](int64_t part, int64_t begin, int64_t size, const uint8_t* above) {
                                         uint8_t* __restrict next = new_mask(part) + begin;
                                         for (int64_t i = 0; i < size; ++i) next[i] |= above[i];
                                       });
    TORCH_INTERNAL_ASSERT(eligible == layout_.total() - (active_ - n_), "kept ", layout_.total() - eligible,
                          " entries, not ", active_ - n_);
    // If the grow window missed, its marks are wrong: narrowing and applying then start again from
    // `kept` (KeepThenGrowKeys rewrites it).
    const KeepThenGrowKeys<scalar_t> kept_then_grow{layers_, parts_, layout_, keep_source_, grow_source_, keep};
    const Threshold<Key> grow_threshold = grow.finish(grow_source_, &kept_then_grow);
    if (grow.settled_in_window()) {
      grow.visit_taken_in_window(grow_source_, grow_threshold, [&](int64_t part, int64_t i) { new_mask(part)[i] = 1; });
    } else {
      apply(kept_then_grow, grow_threshold, /*or_into=*/true);
    }
    zero_off_new_mask();
  }

 private:
  std::vector<int64_t> sizes() const {
    std::vector<int64_t> result;
    for (int64_t layer : parts_) result.push_back(layers_[layer].numel);
    return result;
  }

  uint8_t* new_mask(int64_t part) const { return layers_[parts_[part]].new_mask; }

  // Writes the threshold's selection into the new mask, or ORs it in.
  template <typename Source>
  void apply(const Source& source, const Threshold<Key>& threshold, bool or_into) {
    layout_.for_each_chunk([&](int64_t, int64_t part, int64_t begin, int64_t end) {
      Key keys[kChunk];
      uint8_t taken[kChunk];
      source.keys(part, begin, end, keys);
      threshold.apply(keys, layout_.offset(part) + begin, end - begin, taken);
      uint8_t* __restrict next = new_mask(part) + begin;
      for (int64_t i = 0; i < end - begin; ++i) next[i] = uint8_t(or_into ? next[i] | taken[i] : taken[i]);
    });
  }

  // Weight and state: 0 off the new mask and at newly grown entries, which is every entry that was
  // not active; masked tensors: 0 off the new mask.
  void zero_off_new_mask() {
    layout_.for_each_chunk([&](int64_t, int64_t part, int64_t begin, int64_t end) {
      const Layer& layer = layers_[parts_[part]];
      const int64_t size = end - begin;
      uint8_t zero_weight[kChunk], zero_masked[kChunk], old_buffer[kChunk];
      const uint8_t* __restrict old = layer.mask.read<uint8_t>(begin, end, old_buffer);
      const uint8_t* __restrict now = layer.new_mask + begin;
      uint8_t* __restrict zero_w = zero_weight;
      uint8_t* __restrict zero_m = zero_masked;
      for (int64_t i = 0; i < size; ++i) {
        zero_m[i] = now[i] ^ 1;
        zero_w[i] = uint8_t(old[i] == 0) | zero_m[i];
      }
      zero_where(layer.weight, begin, end, zero_weight);
      for (const Column& column : layer.state) zero_where(column, begin, end, zero_weight);
      for (const Column& column : layer.masked) zero_where(column, begin, end, zero_masked);
    });
  }

  const std::vector<Layer>& layers_;
  const std::vector<int64_t> parts_;
  const Layout layout_;
  const int64_t n_;
  const EligibleKeys<scalar_t, false> keep_source_;
  const EligibleKeys<scalar_t, true> grow_source_;
  ThresholdSearch<Key> keep_;
  int64_t active_ = 0;
};

void prune_grow(at::TensorList weights, at::TensorList masks, at::TensorList prune_scores, at::TensorList grow_scores,
                at::IntArrayRef n, bool global_scope, at::TensorList state, at::IntArrayRef state_layers,
                at::TensorList masked, at::IntArrayRef masked_layers, at::OptionalIntArrayRef active, bool prune_abs,
                bool grow_abs, at::TensorList new_masks) {
  const PruneGrowArguments arguments(weights, masks, prune_scores, grow_scores, n, global_scope, state, state_layers,
                                     masked, masked_layers, active, new_masks);
  check_prune_grow(arguments, [](const at::Tensor& t, const std::string& name) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, " is on ", t.device(), ", not the CPU");
  });
  std::vector<Layer> layers(weights.size());
  for (size_t l = 0; l < weights.size(); ++l) {
    Layer& layer = layers[l];
    layer.numel = weights[l].numel();
    layer.mask = Column(masks[l]);
    layer.prune = Column(prune_scores[l]);
    layer.grow = Column(grow_scores[l]);
    layer.weight = Column(weights[l]);
    layer.new_mask = static_cast<uint8_t*>(new_masks[l].data_ptr());
  }
  for (size_t i = 0; i < state.size(); ++i) layers[state_layers[i]].state.emplace_back(state[i]);
  for (size_t i = 0; i < masked.size(); ++i) layers[masked_layers[i]].masked.emplace_back(masked[i]);
  if (weights.empty()) return;

  std::vector<std::vector<int64_t>> parts(arguments.segments());
  std::vector<int64_t> segment_sizes(arguments.segments(), 0);
  for (int64_t l = 0; l < arguments.layers(); ++l) {
    const int64_t segment = global_scope ? 0 : l;
    parts[segment].push_back(l);
    segment_sizes[segment] += layers[l].numel;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prune_scores[0].scalar_type(), "prune_grow", [&] {
    std::vector<std::unique_ptr<SegmentUpdate<scalar_t>>> updates(parts.size());
    std::vector<int64_t> counts(parts.size());
    for_each_segment(segment_sizes, [&](int64_t s) {
      updates[s] = std::make_unique<SegmentUpdate<scalar_t>>(layers, parts[s], n[s], prune_abs, grow_abs);
      counts[s] = updates[s]->count_active(active ? (*active)[s] : -1);
    });
    // Every count is checked before any segment writes.
    for (int64_t s = 0; s < arguments.segments(); ++s) {
      if (active) {
        TORCH_CHECK_VALUE((*active)[s] == counts[s], arguments.active_name(s), " is ", (*active)[s], " but ",
                          arguments.owner(s), " ", counts[s], " active entries");
      }
      TORCH_CHECK_VALUE(n[s] <= counts[s], arguments.n_name(s), " must be in [0, ", counts[s], "] (",
                        arguments.owner(s), " ", counts[s], " active entries), got ", n[s]);
    }
    for_each_segment(segment_sizes, [&](int64_t s) { updates[s]->update(); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("prune_grow", &prune_grow); }

}  // namespace sparsekern::cpu
