// CPU kernel of sparsekern::prune_grow: two radix selections (select.h) and one pass of writes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/select.h"

namespace sparsekern::cpu {
namespace {

// Keys of one contiguous score array, restricted to the positions where `flags` equals `wanted`.
template <typename scalar_t>
struct EligibleScoreKeys {
  using Key = typename KeyTraits<scalar_t>::Key;
  const scalar_t* scores;
  const bool* flags;
  bool wanted;

  auto reader(int64_t) const {
    return [scores = scores, flags = flags, wanted = wanted](int64_t i) {
      const Key key = score_key(scores[i]);
      return flags[i] == wanted ? key : Key(kIneligibleKey);
    };
  }
};

constexpr int64_t kGrain = int64_t(1) << 15;

template <typename Bits, typename ZeroAt>
void zero_bits(Bits* data, int64_t size, const ZeroAt& zero_at) {
  at::parallel_for(0, size, kGrain, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) data[i] = zero_at(i) ? Bits(0) : data[i];
  });
}

// Sets target's entries to 0 where zero_at(flat position) holds. All-zero bits are +0.0 in every
// float dtype, so only the element size matters. A non-contiguous target is updated through a copy.
template <typename ZeroAt>
void zero_where(const at::Tensor& target, const ZeroAt& zero_at) {
  at::Tensor data = target.contiguous();
  switch (data.element_size()) {
    case 2: zero_bits(static_cast<uint16_t*>(data.data_ptr()), data.numel(), zero_at); break;
    case 4: zero_bits(static_cast<uint32_t*>(data.data_ptr()), data.numel(), zero_at); break;
    case 8: zero_bits(static_cast<uint64_t*>(data.data_ptr()), data.numel(), zero_at); break;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected element size ", data.element_size());
  }
  if (!data.is_same(target)) target.copy_(data);
}

void check_float(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(is_score_dtype(t.scalar_type()), name, " must be float16, bfloat16, float32 or float64, got ",
                   t.scalar_type());
}

void check_like_weight(const at::Tensor& t, const std::string& name, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(t.sizes() == weight.sizes(), name, " must have the shape of weight ", weight.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " is on ", t.device(), ", not the CPU");
}

void check_arguments(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& prune_score,
                     const at::Tensor& grow_score, at::TensorList state) {
  check_float(weight, "weight");
  check_like_weight(weight, "weight", weight);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask.scalar_type());
  check_like_weight(mask, "mask", weight);
  check_float(prune_score, "prune_score");
  check_like_weight(prune_score, "prune_score", weight);
  check_float(grow_score, "grow_score");
  check_like_weight(grow_score, "grow_score", weight);
  TORCH_CHECK_TYPE(grow_score.scalar_type() == prune_score.scalar_type(), "grow_score has dtype ",
                   grow_score.scalar_type(), " but prune_score has ", prune_score.scalar_type());
  for (size_t i = 0; i < state.size(); ++i) {
    const std::string name = "state[" + std::to_string(i) + "]";
    check_float(state[i], name);
    check_like_weight(state[i], name, weight);
  }
}

at::Tensor prune_grow(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& prune_score,
                      const at::Tensor& grow_score, int64_t n, at::TensorList state) {
  check_arguments(weight, mask, prune_score, grow_score, state);
  const at::Tensor old_mask = mask.contiguous();
  const int64_t size = old_mask.numel();
  const int64_t active = old_mask.sum().item<int64_t>();
  const int64_t most = std::min(active, size - active);
  TORCH_CHECK_VALUE(0 <= n && n <= most, "n must be in [0, ", most, "] (mask has ", active, " active and ",
                    size - active, " inactive entries), got ", n);

  // Both selections finish before anything is written, so scores may alias weight or state.
  at::Tensor new_mask = at::empty(mask.sizes(), mask.options());
  at::Tensor grown = at::empty_like(new_mask);
  const bool* old = old_mask.const_data_ptr<bool>();
  bool* kept = new_mask.data_ptr<bool>();
  bool* fresh = grown.data_ptr<bool>();
  const Layout layout({size});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prune_score.scalar_type(), "prune_grow", [&] {
    const at::Tensor prune = prune_score.contiguous();
    const at::Tensor grow = grow_score.contiguous();
    const EligibleScoreKeys<scalar_t> keep_source{prune.const_data_ptr<scalar_t>(), old, true};
    write_selection(keep_source, layout, find_cutoff(keep_source, layout, active - n), {kept});
    // Just-dropped entries compete for growth like never-active ones.
    const EligibleScoreKeys<scalar_t> grow_source{grow.const_data_ptr<scalar_t>(), kept, false};
    write_selection(grow_source, layout, find_cutoff(grow_source, layout, n), {fresh});
  });
  // kept becomes the new mask (kept | grown) and grown becomes the newly grown set (grown & ~old).
  at::parallel_for(0, size, kGrain, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      kept[i] = kept[i] | fresh[i];
      fresh[i] = fresh[i] & !old[i];
    }
  });
  zero_where(weight, [kept, fresh](int64_t i) { return !kept[i] | fresh[i]; });
  for (const at::Tensor& tensor : state) zero_where(tensor, [fresh](int64_t i) { return fresh[i]; });
  return new_mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("prune_grow", &prune_grow); }

}  // namespace sparsekern::cpu
