// CPU kernel of sparsekern::prune_grow: two radix selections (select.h) and one pass of writes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/score_checks.h"
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
    // Flags read as bytes and applied as a bit mask, so that loops over keys vectorize.
    const auto* bytes = reinterpret_cast<const uint8_t*>(flags);
    return [scores = scores, bytes, wanted = uint8_t(wanted)](int64_t i) {
      const Key eligible = Key(Key(0) - Key(bytes[i] == wanted));
      return Key(score_key(scores[i]) & eligible);
    };
  }
};

constexpr int64_t kGrain = int64_t(1) << 15;

template <typename Bits>
void zero_bits(Bits* data, int64_t size, const uint8_t* zero) {
  at::parallel_for(0, size, kGrain, [&](int64_t first, int64_t last) {
    Bits* __restrict values = data;
    const uint8_t* __restrict flags = zero;
    // A mask, not a conditional store, so that the loop vectorizes.
    for (int64_t i = first; i < last; ++i) values[i] &= Bits(Bits(flags[i]) - 1);
  });
}

// Sets target's entries to 0 where zero[flat position] is 1. All-zero bits are +0.0 in every float
// dtype, so only the element size matters. A non-contiguous target is updated through a copy.
void zero_where(const at::Tensor& target, const uint8_t* zero) {
  at::Tensor data = target.contiguous();
  switch (data.element_size()) {
    case 2: zero_bits(static_cast<uint16_t*>(data.data_ptr()), data.numel(), zero); break;
    case 4: zero_bits(static_cast<uint32_t*>(data.data_ptr()), data.numel(), zero); break;
    case 8: zero_bits(static_cast<uint64_t*>(data.data_ptr()), data.numel(), zero); break;
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
  // kept becomes the new mask (kept | grown), grown the newly grown set (grown & ~old), and a third
  // array marks where the weight becomes 0 (~new | newly grown). Bytes, not bools, for arithmetic.
  at::Tensor weight_zero = at::empty_like(new_mask, new_mask.options().dtype(at::kByte));
  auto* zero = weight_zero.data_ptr<uint8_t>();
  at::parallel_for(0, size, kGrain, [&](int64_t first, int64_t last) {
    uint8_t* __restrict next = reinterpret_cast<uint8_t*>(kept);
    uint8_t* __restrict added = reinterpret_cast<uint8_t*>(fresh);
    uint8_t* __restrict zero_weight = zero;
    const auto* __restrict before = reinterpret_cast<const uint8_t*>(old);
    for (int64_t i = first; i < last; ++i) {
      const uint8_t now = next[i] | added[i];
      const uint8_t grown_now = added[i] & (before[i] ^ 1);
      next[i] = now;
      added[i] = grown_now;
      zero_weight[i] = (now ^ 1) | grown_now;
    }
  });
  zero_where(weight, zero);
  for (const at::Tensor& tensor : state) zero_where(tensor, reinterpret_cast<const uint8_t*>(fresh));
  return new_mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("prune_grow", &prune_grow); }

}  // namespace sparsekern::cpu
