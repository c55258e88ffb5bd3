// The mask passes of the dense-kernel path (csrc/cpu/mask_grad.cpp), shared by its autograd Functions:
// weight_for_dense_kernel's and masked_linear_dense_kernel's (csrc/cpu/masked_linear.cpp), whose double
// backward with dense_grad takes the former.
#pragma once

#include <ATen/ATen.h>

namespace sparsekern::cpu {

// where(mask, t, 0), a new tensor: one vectorized pass on CPU (sparsekern::masked_weight), at::where
// elsewhere. Inf or NaN off the mask become 0.
at::Tensor masked(const at::Tensor& t, const at::Tensor& mask);

// A dense kernel's fresh weight gradient masked, +0.0 off the mask whatever it held there (a select,
// as the reference's): in place where it can be (sparsekern::mask_grad_ on CPU, an integer multiply of
// its bits on a GPU); out of place, and recorded, when grad mode is on (double backward), grad is not contiguous or
// vmap batches it.
at::Tensor mask_weight_grad(const at::Tensor& grad, const at::Tensor& mask);

// The weight a dense kernel multiplies by (sparsekern::weight_for_dense_kernel): weight itself when
// zero_off_mask, else masked(weight, mask), as an autograd Function whose backward masks the gradient
// (mask_weight_grad), or passes it straight through when dense_grad.
at::Tensor weight_for_dense_kernel(const at::Tensor& weight, const at::Tensor& mask, bool zero_off_mask,
                                   bool dense_grad);

}  // namespace sparsekern::cpu
