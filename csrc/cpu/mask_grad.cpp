// mask_grad_ on CPU: grad *= mask in place, one pass, no temporary: the weight gradient of the
// dense-kernel path (sparsekern/ops/_masked_linear_op.py). Off the mask the result is grad * 0:
// exactly 0 for a finite entry, NaN for an inf or NaN one (a step GradScaler skips stays skipped).
//
// weight_for_dense_kernel: the weight a dense kernel multiplies by (contract and Python twin:
// sparsekern/ops/_masked_linear_op.py), as a C++ autograd Function. In eager mode it replaces the
// Python Function, whose forward and backward calls cost ~17 us more per layer and step, more than
// the products of a small layer; torch.compile traces the Python one. mask_grad_ is registered as an
// op of its own so that it can be checked against torch on its own.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace sparsekern::cpu {
namespace {

// A mask byte as the factor 0 or 1. Written as arithmetic on purpose: GCC 12 compiles
// `static_cast<float>(m != 0)` and `m ? g : g * 0` to a branch per entry, which stops the loop
// from vectorizing (-fopt-info-vec: "control flow in loop"); (m + 255) >> 8 is 1 for every
// non-zero byte (a bool tensor written as uint8 may hold any) and 0 for 0, and vectorizes.
inline int32_t factor(uint8_t m) { return static_cast<int32_t>((static_cast<uint32_t>(m) + 255u) >> 8); }

template <typename T>
void mask_block(T* __restrict grad, const uint8_t* __restrict mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) grad[i] *= static_cast<T>(factor(mask[i]));
}

// float16 and bfloat16 multiply in float (exact for a factor of 0 or 1).
template <>
void mask_block<at::Half>(at::Half* __restrict grad, const uint8_t* __restrict mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) grad[i] = static_cast<float>(grad[i]) * static_cast<float>(factor(mask[i]));
}

template <>
void mask_block<at::BFloat16>(at::BFloat16* __restrict grad, const uint8_t* __restrict mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) grad[i] = static_cast<float>(grad[i]) * static_cast<float>(factor(mask[i]));
}

// Blocks of a thread's range are walked last to first: the kernel that wrote the gradient wrote
// its end last, so that is what is still in cache (the same order as the torch fallback, whose
// measurement is in _masked_linear_op.py).
constexpr int64_t kBlock = 1 << 14;

template <typename T>
void mask_range(T* grad, const uint8_t* mask, int64_t begin, int64_t end) {
  for (int64_t stop = end; stop > begin; stop -= kBlock) {
    const int64_t start = std::max(begin, stop - kBlock);
    mask_block(grad + start, mask + start, stop - start);
  }
}

void mask_grad_(const at::Tensor& grad, const at::Tensor& mask) {
  const at::ScalarType dtype = grad.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   "grad must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.sizes() == grad.sizes(), "mask must have grad's shape ", grad.sizes(), ", got ",
                    mask.sizes());
  TORCH_CHECK_VALUE(mask.device() == grad.device(), "mask is on ", mask.device(), " but grad is on ",
                    grad.device());
  // Written through one flat pointer: an expanded or strided gradient is the caller's to avoid.
  TORCH_CHECK_VALUE(grad.is_contiguous(), "grad must be contiguous (it is masked in place)");
  const at::Tensor mask_c = mask.contiguous();
  const int64_t n = grad.numel();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask_c.const_data_ptr<bool>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mask_grad_", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    // Grain: a task large enough that scheduling costs little next to the pass over it.
    at::parallel_for(0, n, kBlock, [&](int64_t begin, int64_t end) { mask_range(g, m, begin, end); });
  });
}

// where(mask, t, 0): a select, so that inf or NaN off the mask cannot leak.
at::Tensor masked(const at::Tensor& t, const at::Tensor& mask) {
  return at::where(mask, t, at::zeros({}, t.options()));
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
      const at::Tensor mask = ctx->get_saved_variables()[0];
      if (at::GradMode::is_enabled() || !grad.is_contiguous()) {
        // A graph for double backward (or a gradient laid out oddly): the out-of-place select.
        grad = masked(grad, mask);
      } else if (grad.device().is_cpu()) {
        // The weight gradient the dense kernel just wrote, which nothing else holds: masked where it lies.
        // Through the dispatcher, not the kernel itself: a tracer's fake tensors reach the fake impl.
        static const auto op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("sparsekern::mask_grad_", "")
                                   .typed<void(const at::Tensor&, const at::Tensor&)>();
        op.call(grad, mask);
      } else {
        grad.mul_(mask);  // GPU kernels convert the mask as they read it: no temporary
      }
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor weight_for_dense_kernel(const at::Tensor& weight, const at::Tensor& mask, bool zero_off_mask,
                                   bool dense_grad) {
  return WeightForDenseKernel::apply(weight, mask, zero_off_mask, dense_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("mask_grad_", &mask_grad_); }

// Above autograd, on every device: the Function records its own backward node.
TORCH_LIBRARY_IMPL(sparsekern, CompositeImplicitAutograd, m) {
  m.impl("weight_for_dense_kernel", &weight_for_dense_kernel);
}

}  // namespace sparsekern::cpu
