// CPU kernels of sparsekern::topk_mask (one selection over the whole list) and
// sparsekern::topk_mask_per_tensor (one per tensor), by radix select (select.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/select.h"
#include "cpu/score_checks.h"

namespace sparsekern::cpu {
namespace {

// Keys of contiguous score arrays, one array per tensor of the list.
template <typename scalar_t>
struct ScoreKeys {
  using Key = typename KeyTraits<scalar_t>::Key;
  std::vector<const scalar_t*> parts;

  auto reader(int64_t part) const {
    const scalar_t* scores = parts[part];
    return [scores](int64_t i) { return score_key(scores[i]); };
  }
};

void check_scores(at::TensorList scores) {
  check_score_dtypes(scores);
  for (size_t i = 0; i < scores.size(); ++i) {
    TORCH_CHECK_VALUE(scores[i].device().is_cpu(), "scores[", i, "] is on ", scores[i].device(),
                      ", not the CPU");
  }
}

// One selection of exactly k entries over all of `scores`; `k_name` names k in the error raised when
// fewer than k scores are numbers.
std::vector<at::Tensor> select_masks(at::TensorList scores, int64_t k, const std::string& k_name) {
  std::vector<at::Tensor> inputs;
  std::vector<at::Tensor> masks;
  std::vector<int64_t> sizes;
  std::vector<bool*> out;
  for (const at::Tensor& s : scores) {
    inputs.push_back(s.contiguous());
    masks.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
    sizes.push_back(s.numel());
    out.push_back(masks.back().data_ptr<bool>());
  }
  const Layout layout(sizes);
  if (scores.empty()) return masks;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores[0].scalar_type(), "topk_mask", [&] {
    ScoreKeys<scalar_t> source;
    for (const at::Tensor& input : inputs) source.parts.push_back(input.const_data_ptr<scalar_t>());
    const auto cutoff = find_cutoff(source, layout, k);
    // A cutoff at NaN means the k-th best is a NaN: every number is above it, and too few of them.
    TORCH_CHECK_VALUE(k == 0 || cutoff.key != kNaNKey, k_name, "=", k, " is more than the ",
                      k - cutoff.equal_taken, " non-NaN scores available");
    write_selection(source, layout, cutoff, out);
  });
  return masks;
}

std::vector<at::Tensor> topk_mask(at::TensorList scores, int64_t k) {
  check_scores(scores);
  check_global_k(scores, k);
  return select_masks(scores, k, "k");
}

std::vector<at::Tensor> topk_mask_per_tensor(at::TensorList scores, at::IntArrayRef k) {
  check_scores(scores);
  check_per_tensor_k(scores, k);
  std::vector<at::Tensor> masks;
  for (size_t i = 0; i < scores.size(); ++i) {
    masks.push_back(select_masks({scores[i]}, k[i], "k[" + std::to_string(i) + "]")[0]);
  }
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("topk_mask", &topk_mask);
  m.impl("topk_mask_per_tensor", &topk_mask_per_tensor);
}

}  // namespace sparsekern::cpu
