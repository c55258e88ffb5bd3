// The schemas of sparsekern's compiled ops. Kernels register against them per dispatch key
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*_cuda.cpp for CUDA); the contracts are in sparsekern/ops/__init__.py.
#include <torch/library.h>

TORCH_LIBRARY(sparsekern, m) {
  // One global selection over every tensor of `scores`: exactly k entries, best first by
  // (score descending, NaN never, lower flat position across the list on ties).
  m.def("topk_mask(Tensor[] scores, int k) -> Tensor[]");
  // The same rule applied to each tensor alone, with its own k.
  m.def("topk_mask_per_tensor(Tensor[] scores, int[] k) -> Tensor[]");
  // Keep the (active - n) best active entries by prune_score, grow the n best of the rest by
  // grow_score; zero weight off the new mask and at new positions, zero `state` at new positions.
  m.def(
      "prune_grow(Tensor(a!) weight, Tensor mask, Tensor prune_score, Tensor grow_score, int n, "
      "Tensor(b!)[] state) -> Tensor");
  // y = x @ W.T (+ bias) for W packed by sparsekern.ops.pack (bitmap, values, chunk_offsets:
  // layout in sparsekern/ops/packing.py); x is (..., in_features), y is (..., out_features).
  m.def(
      "sparse_linear(Tensor x, Tensor bitmap, Tensor values, Tensor chunk_offsets, Tensor? bias) "
      "-> Tensor");
}
