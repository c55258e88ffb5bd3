// mask_grad_ on CPU: grad = where(mask, grad, 0) in place, one vectorized pass, no temporary: the
// weight gradient of the dense-kernel path (sparsekern/ops/_masked_linear_op.py). Off the mask the
// result is +0.0 whatever the gradient held there (inf and NaN included), as the reference's select
// gives: every backend masks the weight gradient alike.
//
// masked_weight on CPU: where(mask, t, 0) in one vectorized pass, the masked weight a dense kernel
// multiplies by (torch.where reads its bool condition entry by entry: measured at one thread, 6x
// slower on a 256x256 float32 weight, 3x on a 2048x2048 one, whose pass is bound by memory).
//
// weight_for_dense_kernel: the weight a dense kernel multiplies by (contract and Python twin:
// sparsekern/ops/_masked_linear_op.py), as a C++ autograd Function. In eager mode it replaces the
// Python Function, whose forward and backward calls cost ~17 us more per layer and step, more than
// the products of a small layer; torch.compile traces the Python one. mask_grad_ and masked_weight
// are registered as ops of their own so that each can be checked against torch on its own.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "mask.h"

namespace sparsekern::cpu {
namespace {

// A mask byte as the factor 0 or 1. Written as arithmetic on purpose: GCC 12 compiles
// `static_cast<float>(m != 0)` and `m ? g : g * 0` to a branch per entry, which stops the loop
// from vectorizing (-fopt-info-vec: "control flow in loop"); (m + 255) >> 8 is 1 for every
// non-zero byte (a bool tensor written as uint8 may hold any) and 0 for 0, and vectorizes.
inline int32_t factor(uint8_t m) { return static_cast<int32_t>((static_cast<uint32_t>(m) + 255u) >> 8); }

// Blocks of a thread's range are walked last to first: the kernel that wrote the gradient wrote
// its end last, so that is what is still in cache (the same order as the torch fallback, whose
// measurement is in _masked_linear_op.py).
constexpr int64_t kBlock = 1 << 14;

// The value's bits ANDed with all ones (mask byte non-zero) or all zeros (+0.0): a select, not a
// product, so inf or NaN off the mask cannot leak; as integer arithmetic on the bits it needs no
// float type (float16 and bfloat16 alike) and vectorizes (negated in Bits: negating the int factor
// and widening it after stopped GCC 12 from vectorizing 64-bit entries).
template <typename Bits>
inline Bits keep_bits(uint8_t m) {
  return static_cast<Bits>(Bits{0} - static_cast<Bits>(factor(m)));
}

template <typename Bits>
void select_in_place_block(Bits* __restrict grad, const uint8_t* __restrict mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) grad[i] &= keep_bits<Bits>(mask[i]);
}

template <typename Bits>
void select_in_place(const at::Tensor& grad, const uint8_t* mask) {
  Bits* g = static_cast<Bits*>(grad.data_ptr());
  // Grain: a task large enough that scheduling costs little next to the pass over it.
  at::parallel_for(0, grad.numel(), kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t stop = end; stop > begin; stop -= kBlock) {
      const int64_t start = std::max(begin, stop - kBlock);
      select_in_place_block(g + start, mask + start, stop - start);
    }
  });
}

// Calls `f` with a zero of the unsigned integer type as wide as an entry of `t` (float16 and bfloat16: 2
// bytes, float32: 4, float64: 8): the selects work on bits, so one instance per width serves every dtype.
template <typename F>
void with_bits_type(const at::Tensor& t, F&& f) {
  switch (t.element_size()) {
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    default: f(uint64_t{}); break;
  }
}

void check_mask(const at::Tensor& t, const char* name, const at::Tensor& mask) {
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   name, " must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.sizes() == t.sizes(), "mask must have ", name, "'s shape ", t.sizes(), ", got ",
                    mask.sizes());
  TORCH_CHECK_VALUE(mask.device() == t.device(), "mask is on ", mask.device(), " but ", name, " is on ",
                    t.device());
}

void mask_grad_(const at::Tensor& grad, const at::Tensor& mask) {
  check_mask(grad, "grad", mask);
  // Written through one flat pointer: an expanded or strided gradient is the caller's to avoid.
  TORCH_CHECK_VALUE(grad.is_contiguous(), "grad must be contiguous (it is masked in place)");
  const at::Tensor mask_c = mask.contiguous();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask_c.const_data_ptr<bool>());
  with_bits_type(grad, [&](auto zero) { select_in_place<decltype(zero)>(grad, m); });
}

// out = in where the mask byte is non-zero, else +0.0 (keep_bits).
template <typename Bits>
void select_block(Bits* __restrict out, const Bits* __restrict in, const uint8_t* __restrict mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = in[i] & keep_bits<Bits>(mask[i]);
}

template <typename Bits>
void select_all(const at::Tensor& out, const at::Tensor& in, const uint8_t* mask) {
  Bits* o = static_cast<Bits*>(out.data_ptr());
  const Bits* i = static_cast<const Bits*>(in.const_data_ptr());
  at::parallel_for(0, in.numel(), kBlock, [&](int64_t begin, int64_t end) {
    select_block(o + begin, i + begin, mask + begin, end - begin);
  });
}

at::Tensor masked_weight_cpu(const at::Tensor& weight, const at::Tensor& mask) {
  check_mask(weight, "weight", mask);
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  at::Tensor out = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask_c.const_data_ptr<bool>());
  with_bits_type(weight, [&](auto zero) { select_all<decltype(zero)>(out, weight_c, m); });
  return out;
}

class WeightForDenseKernel : public torch::autograd::Function<WeightForDenseKernel> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& mask,
                            bool zero_off_mask, bool dense_grad) {
    ctx->saved_data["dense_grad"] = dense_grad;
    ctx->save_for_backward({mask});
    return zero_off_mask ? weight.view_as(weight) : masked(weight, mask);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    at::Tensor grad = grads[0];
    if (!ctx->saved_data["dense_grad"].toBool() && grad.defined()) {
      grad = mask_weight_grad(grad, ctx->get_saved_variables()[0]);
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor weight_for_dense_kernel(const at::Tensor& weight, const at::Tensor& mask, bool zero_off_mask,
                                   bool dense_grad) {
  return WeightForDenseKernel::apply(weight, mask, zero_off_mask, dense_grad);
}

at::Tensor masked(const at::Tensor& t, const at::Tensor& mask) {
  // masked_weight has no autograd formula: a select to be differentiated (double backward) is at::where.
  if (t.device().is_cpu() && !(at::GradMode::is_enabled() && t.requires_grad())) {
    // Through the dispatcher, not the kernel itself: a tracer's fake tensors reach the fake impl.
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("sparsekern::masked_weight", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    return op.call(t, mask);
  }
  return at::where(mask, t, at::zeros({}, t.options()));  // GPU kernels read the bool condition fast enough
}

at::Tensor mask_weight_grad(const at::Tensor& grad, const at::Tensor& mask) {
  // A gradient vmap batches (a graph recorded outside any transform, differentiated under one:
  // torch.autograd.grad's is_grads_batched, functional.jacobian's vectorize, torch.func.vmap over
  // autograd.grad): mask_grad_, in place, has no batching rule.
  static const c10::DispatchKeySet batched({c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched});
  if (at::GradMode::is_enabled() || !grad.is_contiguous() || grad.key_set().has_any(batched)) {
    // A graph for double backward (or a gradient laid out oddly, or batched): the out-of-place
    // select, recorded.
    return at::where(mask, grad, at::zeros({}, grad.options()));
  }
  if (grad.device().is_cpu()) {
    // The weight gradient a dense kernel just wrote, which nothing else holds: masked where it lies.
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("sparsekern::mask_grad_", "")
                               .typed<void(const at::Tensor&, const at::Tensor&)>();
    op.call(grad, mask);
    return grad;
  }
  // Elsewhere (a GPU): the gradient's bits times the mask, as integers of their width: an exact select
  // (+0.0 off the mask, inf and NaN included) in place, with the mask converted as the kernel reads it.
  // No allocation at all: where's 0-dim `other` would be one (512 bytes on a GPU) above a dense step's peak.
  const at::ScalarType bits = grad.element_size() == 2 ? at::kShort : grad.element_size() == 4 ? at::kInt : at::kLong;
  grad.view(bits).mul_(mask);
  return grad;
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("mask_grad_", &mask_grad_);
  m.impl("masked_weight", &masked_weight_cpu);
}

// Above autograd, on every device: the Function records its own backward node.
TORCH_LIBRARY_IMPL(sparsekern, CompositeImplicitAutograd, m) {
  m.impl("weight_for_dense_kernel", &weight_for_dense_kernel);
}

}  // namespace sparsekern::cpu
