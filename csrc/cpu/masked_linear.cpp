// masked_linear_dense_kernel: sparsekern.ops.masked_linear on the dense kernel, as one C++ autograd
// Function (contract and caller: sparsekern/ops/_masked_linear_op.py), which eager SparseLinear calls
// take. Eager mode only; torch.compile traces F.linear on weight_for_dense_kernel's Python Function in
// both states.
//
// zero_off_mask: the products take the weight itself. Otherwise the masked weight is made anew for
// each product that reads it, the forward's and dx's, and freed after it: F.linear on
// weight_for_dense_kernel's result would keep it from forward to backward, one more weight-sized
// tensor per layer held through the step, where this costs one more vectorized pass. One node per
// layer, where F.linear on weight_for_dense_kernel records three (the Function's, t's and addmm's):
// ~20 us less per layer and step (measurements: sparsekern/ops/_masked_linear_op.py).
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "mask.h"

namespace sparsekern::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Edges of the Function's tensor inputs (mask has one too; bias only when given).
constexpr size_t kX = 0, kWeight = 1, kBias = 3;

// What backward reads of the forward's flags, as bits of one saved entry: each saved_data entry is
// a hashed string key written in forward and looked up in backward.
constexpr int64_t kDenseGrad = 1, kZeroOffMask = 2, kHasBias = 4;

// (..., features) as (rows, features); reshape(-1, 0) would be ambiguous for 0 features. A 2-D
// tensor is that already (reshape would still dispatch a view).
at::Tensor rows(const at::Tensor& t) {
  if (t.dim() == 2) return t;
  return t.reshape({c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1), t.size(-1)});
}

class MaskedLinear : public torch::autograd::Function<MaskedLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& mask, const std::optional<at::Tensor>& bias, bool dense_grad,
                            bool zero_off_mask) {
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["flags"] = (dense_grad ? kDenseGrad : 0) | (zero_off_mask ? kZeroOffMask : 0) |
                               (has_bias ? kHasBias : 0);
    // Only what the gradients to come read: dx reads the weight, dweight reads x. Asked of the inputs,
    // not of ctx->needs_input_grad: run inside a backward (non-reentrant activation checkpointing
    // recomputes the forward there), that answers for the backward under way, whose graph lacks the
    // nodes just recorded, and saved less than the first forward did (CheckpointError).
    ctx->save_for_backward(
        {weight.requires_grad() ? x : at::Tensor(), x.requires_grad() ? weight : at::Tensor(), mask});
    return at::linear(x, zero_off_mask ? weight : masked(weight, mask), bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_out = grads[0];
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mask = saved[2];
    const int64_t flags = ctx->saved_data["flags"].toInt();
    at::Tensor grad_x, grad_weight, grad_bias;
    // dx before dweight: a masked weight is freed before the weight gradient is allocated, so the
    // step never holds both (a dense step holds the weight gradient alone).
    if (ctx->needs_input_grad(kX)) {
      at::Tensor product_weight;
      if (!at::GradMode::is_enabled()) {
        product_weight = (flags & kZeroOffMask) ? weight : masked(weight, mask);
      } else if (flags & kDenseGrad) {
        // Recorded for double backward with dense_grad: the masked weight's values, its gradient passed
        // straight through, as through y (a gradient penalty's part of the dense gradient).
        product_weight = weight_for_dense_kernel(weight, mask, (flags & kZeroOffMask) != 0, /*dense_grad=*/true);
      } else {
        // Recorded for double backward, the select even on a weight that is 0 off the mask: the
        // weight's gradient through dx must be masked too.
        product_weight = masked(weight, mask);
      }
      // mm for rows (matmul would dispatch to it through a layer of its own).
      grad_x = grad_out.dim() == 2 ? at::mm(grad_out, product_weight) : at::matmul(grad_out, product_weight);
    }
    const at::Tensor grad_rows = rows(grad_out);  // a copy where grad_out is not laid out as rows
    if (ctx->needs_input_grad(kWeight)) {
      grad_weight = at::mm(grad_rows.t(), rows(x));
      if (!(flags & kDenseGrad)) grad_weight = mask_weight_grad(grad_weight, mask);
    }
    if ((flags & kHasBias) && ctx->needs_input_grad(kBias)) grad_bias = grad_rows.sum(0);
    return {grad_x, grad_weight, at::Tensor(), grad_bias, at::Tensor(), at::Tensor()};
  }
};

// The conditions of sparsekern.ops.masked_linear's argument checks (masked_linear_args in
// sparsekern/ops/_checks.py), tested here before anything runs: its eager CPU calls come straight
// here and, where this raises, run the Python checks to say which argument is wrong. In Python they
// cost ~5 us per layer and training step, a tenth of a small layer's. Sizes as SymInts: a tracer's
// symbolic shapes compare too.
void check_arguments(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                     const std::optional<at::Tensor>& bias) {
  const at::ScalarType dtype = x.scalar_type();
  const bool floating = dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
  // First: a nested tensor's layout can be strided, and its sizes throw an internal error.
  const bool strided = x.layout() == at::kStrided && weight.layout() == at::kStrided && mask.layout() == at::kStrided &&
                       !x.is_nested() && !weight.is_nested() && !mask.is_nested();
  const bool shapes = strided && weight.dim() == 2 && x.dim() >= 1 && x.sym_size(-1) == weight.sym_size(1) &&
                      mask.sym_sizes() == weight.sym_sizes();
  const bool bias_ok = !bias.has_value() || !bias->defined() ||
                       (bias->layout() == at::kStrided && !bias->is_nested() && bias->scalar_type() == dtype &&
                        bias->dim() == 1 && shapes && bias->sym_size(0) == weight.sym_size(0) &&
                        bias->device() == x.device());
  TORCH_CHECK(floating && weight.scalar_type() == dtype && mask.scalar_type() == at::kBool && shapes && strided &&
                  bias_ok && weight.device() == x.device() && mask.device() == x.device(),
              "masked_linear_dense_kernel: arguments that sparsekern.ops.masked_linear refuses (it says why)");
}

at::Tensor masked_linear_dense_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                      const std::optional<at::Tensor>& bias, bool dense_grad, bool zero_off_mask) {
  check_arguments(x, weight, mask, bias);
  const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  if (!(at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || bias_grad))) {
    // No gradient to compute: no autograd node.
    return at::linear(x, zero_off_mask ? weight : masked(weight, mask), bias);
  }
  return MaskedLinear::apply(x, weight, mask, bias, dense_grad, zero_off_mask);
}

}  // namespace

// Above autograd, on every device: the Function records its own backward node.
TORCH_LIBRARY_IMPL(sparsekern, CompositeImplicitAutograd, m) {
  m.impl("masked_linear_dense_kernel", &masked_linear_dense_kernel);
}

}  // namespace sparsekern::cpu
