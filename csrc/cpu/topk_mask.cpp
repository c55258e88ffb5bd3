// CPU kernels of sparsekern::topk_mask (one selection over the whole list) and
// sparsekern::topk_mask_per_tensor (one per tensor), by radix select (select.h): per selection a
// sample and one pass that reads the scores and writes the masks, but for the few keys settled
// after it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu/columns.h"
#include "cpu/score_checks.h"
#include "cpu/select.h"

namespace sparsekern::cpu {
namespace {

// Keys of score tensors of any strides; NaN is never selected, so it is ineligible.
template <typename scalar_t>
struct ScoreKeys {
  using Key = typename KeyTraits<scalar_t>::Key;
  std::vector<Column> parts;
  KeyRule<scalar_t> rule{false, kIneligibleKey};

  void keys(int64_t part, int64_t begin, int64_t end, Key* __restrict out) const {
    Key buffer[kChunk];
    const Key* __restrict bits = parts[part].template read<Key>(begin, end, buffer);
    const KeyRule<scalar_t> local = rule;  // a local copy keeps the loop free of reloads
    for (int64_t i = 0; i < end - begin; ++i) out[i] = local(bits[i]);
  }
};

// One selection of k entries over some of the tensors (a segment).
template <typename scalar_t>
class SegmentSelection {
 public:
  using Key = typename KeyTraits<scalar_t>::Key;

  SegmentSelection(std::vector<Column> scores, const std::vector<int64_t>& sizes, std::vector<uint8_t*> out,
                   int64_t k)
      : source_{std::move(scores)}, layout_(sizes), out_(std::move(out)), k_(k), search_(layout_) {}

  // Reads the scores once, writing the masks where it can already tell (the caller then checks k
  // against the count returned: the numbers).
  int64_t count_numbers() {
    return search_.scan(source_, Target{k_, false}, -1,
                        [&](int64_t part, int64_t begin, int64_t size, const uint8_t* above) {
                          std::memcpy(out_[part] + begin, above, size);
                        });
  }

  void write() {
    const Threshold<Key> threshold = search_.finish(source_);
    if (search_.settled_in_window()) {
      search_.visit_taken_in_window(source_, threshold, [&](int64_t part, int64_t i) { out_[part][i] = 1; });
      return;
    }
    layout_.for_each_chunk([&](int64_t, int64_t part, int64_t begin, int64_t end) {
      Key keys[kChunk];
      source_.keys(part, begin, end, keys);
      threshold.apply(keys, layout_.offset(part) + begin, end - begin, out_[part] + begin);
    });
  }

 private:
  const ScoreKeys<scalar_t> source_;
  const Layout layout_;
  const std::vector<uint8_t*> out_;
  const int64_t k_;
  ThresholdSearch<Key> search_;
};

void check_scores(at::TensorList scores) {
  check_score_dtypes(scores);
  for (size_t i = 0; i < scores.size(); ++i) {
    TORCH_CHECK_VALUE(scores[i].device().is_cpu(), "scores[", i, "] is on ", scores[i].device(),
                      ", not the CPU");
  }
}

// One selection per segment (a run of consecutive tensors) of exactly k[segment] entries; `k_name`
// names k in the error raised when fewer than k scores are numbers. Every segment is counted before
// any mask is written.
std::vector<at::Tensor> select_masks(at::TensorList scores, const std::vector<std::vector<int64_t>>& segments,
                                     const std::vector<int64_t>& k, const std::vector<std::string>& k_names) {
  std::vector<at::Tensor> masks;
  for (const at::Tensor& s : scores) masks.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
  if (scores.empty()) return masks;
  std::vector<int64_t> segment_sizes;
  for (const auto& tensors : segments) {
    int64_t size = 0;
    for (int64_t t : tensors) size += scores[t].numel();
    segment_sizes.push_back(size);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores[0].scalar_type(), "topk_mask", [&] {
    std::vector<std::unique_ptr<SegmentSelection<scalar_t>>> selections(segments.size());
    std::vector<int64_t> numbers(segments.size());
    for_each_segment(segment_sizes, [&](int64_t s) {
      std::vector<Column> columns;
      std::vector<int64_t> sizes;
      std::vector<uint8_t*> out;
      for (int64_t t : segments[s]) {
        columns.emplace_back(scores[t]);
        sizes.push_back(scores[t].numel());
        out.push_back(static_cast<uint8_t*>(masks[t].data_ptr()));
      }
      selections[s] = std::make_unique<SegmentSelection<scalar_t>>(std::move(columns), sizes, std::move(out), k[s]);
      numbers[s] = selections[s]->count_numbers();
    });
    for (size_t s = 0; s < segments.size(); ++s) {
      TORCH_CHECK_VALUE(k[s] <= numbers[s], k_names[s], "=", k[s], " is more than the ", numbers[s],
                        " non-NaN scores available");
    }
    for_each_segment(segment_sizes, [&](int64_t s) { selections[s]->write(); });
  });
  return masks;
}

std::vector<at::Tensor> topk_mask(at::TensorList scores, int64_t k) {
  check_scores(scores);
  check_global_k(scores, k);
  std::vector<int64_t> all(scores.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  return select_masks(scores, {all}, {k}, {"k"});
}

std::vector<at::Tensor> topk_mask_per_tensor(at::TensorList scores, at::IntArrayRef k) {
  check_scores(scores);
  check_per_tensor_k(scores, k);
  std::vector<std::vector<int64_t>> segments;
  std::vector<std::string> names;
  for (size_t i = 0; i < scores.size(); ++i) {
    segments.push_back({static_cast<int64_t>(i)});
    names.push_back("k[" + std::to_string(i) + "]");
  }
  return select_masks(scores, segments, k.vec(), names);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("topk_mask", &topk_mask);
  m.impl("topk_mask_per_tensor", &topk_mask_per_tensor);
}

}  // namespace sparsekern::cpu
