// The schemas of sparsekern's compiled ops. Kernels register against them per dispatch key
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*_cuda.cpp for CUDA); the contracts are in sparsekern/ops/__init__.py.
#include <torch/library.h>

TORCH_LIBRARY(sparsekern, m) {
  // One global selection over every tensor of `scores`: exactly k entries, best first by
  // (score descending, NaN never, lower flat position across the list on ties).
  m.def("topk_mask(Tensor[] scores, int k) -> Tensor[]");
  // The same rule applied to each tensor alone, with its own k.
  m.def("topk_mask_per_tensor(Tensor[] scores, int[] k) -> Tensor[]");
  // The drop-and-grow update of a list of layers (contract: sparsekern.ops.prune_grow). Per segment
  // (each layer, or the whole list when global_scope) keep the (active - n) best active entries by
  // prune score, grow the n best of the rest by grow score (scores ranked by |score| when *_abs);
  // zero each weight and its `state` tensors off the new mask and at newly grown entries, and its
  // `masked` tensors off the new mask. state_layers / masked_layers give each such tensor's layer;
  // `active`, when given, is the caller's active count per segment. The new masks are written into
  // `new_masks` (contiguous bool tensors shaped like the masks): a mutating op cannot return a list
  // and still work under torch.compile.
  m.def(
      "prune_grow(Tensor(a!)[] weights, Tensor[] masks, Tensor[] prune_scores, Tensor[] grow_scores, int[] n, "
      "bool global_scope, Tensor(b!)[] state, int[] state_layers, Tensor(c!)[] masked, int[] masked_layers, "
      "int[]? active, bool prune_abs, bool grow_abs, Tensor(d!)[] new_masks) -> ()");
  // y = x @ W.T (+ bias) for W packed by sparsekern.ops.pack (bitmap, values, chunk_offsets:
  // layout in sparsekern/ops/packing.py); x is (..., in_features), y is (..., out_features).
  m.def(
      "sparse_linear(Tensor x, Tensor bitmap, Tensor values, Tensor chunk_offsets, Tensor? bias) "
      "-> Tensor");
  // grad *= mask in place (mask: bool, grad's shape; grad: contiguous float): the weight gradient
  // of a dense kernel (F.linear, a convolution) masked where it lies, in one pass with no temporary.
  m.def("mask_grad_(Tensor(a!) grad, Tensor mask) -> ()");
  // The weight a dense kernel multiplies by to compute with weight * mask (contract:
  // sparsekern.ops.weight_for_dense_kernel): weight itself when zero_off_mask, else where(mask, weight, 0);
  // its gradient is masked in place, or left whole when dense_grad. Eager mode only (its autograd is C++).
  m.def("weight_for_dense_kernel(Tensor weight, Tensor mask, bool zero_off_mask, bool dense_grad) -> Tensor");
  // where(mask, weight, 0) as a new contiguous tensor (mask: bool, weight's shape): the masked weight a
  // dense kernel multiplies by; inf or NaN off the mask become 0.
  m.def("masked_weight(Tensor weight, Tensor mask) -> Tensor");
  // masked_linear (contract: sparsekern.ops.masked_linear) on the dense kernel: on the weight itself when
  // zero_off_mask, else on the masked weight, made for each product and not kept for backward; the
  // weight gradient is masked in place unless dense_grad. Eager mode only (its autograd is C++).
  m.def(
      "masked_linear_dense_kernel(Tensor x, Tensor weight, Tensor mask, Tensor? bias, bool dense_grad, "
      "bool zero_off_mask) -> Tensor");
}
