// Torch glue of prune_grow on CUDA (the same C++ signature as the CPU kernel, which the dispatcher
// requires): argument checks, allocation, current stream. No host synchronization and no pageable
// copy: the kernels find the active counts themselves, every table reaches the device through
// kernel parameters, and tensors of any strides are read and written in place. The device code is
// torch-free in prune_grow.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/score_checks.h"
#include "cuda/radix_select.h"
#include "cuda/select_glue.h"

namespace sparsekern::cuda {
namespace {

void prune_grow(at::TensorList weights, at::TensorList masks, at::TensorList prune_scores, at::TensorList grow_scores,
                at::IntArrayRef n, bool global_scope, at::TensorList state, at::IntArrayRef state_layers,
                at::TensorList masked, at::IntArrayRef masked_layers, at::OptionalIntArrayRef active, bool prune_abs,
                bool grow_abs, at::TensorList new_masks) {
  const PruneGrowArguments arguments(weights, masks, prune_scores, grow_scores, n, global_scope, state, state_layers,
                                     masked, masked_layers, active, new_masks);
  // An empty weight list is checked too (stray masks, scores or counts raise, as on the CPU); it
  // has no tensor whose device the checks would compare.
  const at::Device device = weights.empty() ? at::Device(at::kCUDA) : weights[0].device();
  // The counts themselves are not read: `active` (when given) bounds n here, and the kernels count
  // on the device (a wrong `active` leaves the counts unspecified, never memory unsafe).
  check_prune_grow(arguments, [&](const at::Tensor& t, const std::string& name) {
    TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but weights[0] is on ", device);
  });
  if (weights.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  TensorRefs refs;
  std::vector<PruneGrowLayer> layers;
  for (size_t l = 0; l < weights.size(); ++l) {
    layers.push_back(PruneGrowLayer{refs.add(masks[l], false), refs.add(prune_scores[l], false),
                                    refs.add(grow_scores[l], false), new_masks[l].data_ptr<bool>(),
                                    weights[l].numel()});
  }
  // Zero targets sorted by layer: each weight, then its state tensors, then its masked tensors.
  std::vector<ZeroTarget> targets;
  for (int64_t l = 0; l < arguments.layers(); ++l) {
    targets.push_back(ZeroTarget{refs.add(weights[l], true), static_cast<int>(weights[l].element_size()),
                                 static_cast<int>(l), 1});
    for (size_t i = 0; i < state.size(); ++i) {
      if (state_layers[i] != l) continue;
      targets.push_back(ZeroTarget{refs.add(state[i], true), static_cast<int>(state[i].element_size()),
                                   static_cast<int>(l), 1});
    }
    for (size_t i = 0; i < masked.size(); ++i) {
      if (masked_layers[i] != l) continue;
      targets.push_back(ZeroTarget{refs.add(masked[i], true), static_cast<int>(masked[i].element_size()),
                                   static_cast<int>(l), 0});
    }
  }
  const FloatType score_type = float_type(prune_scores[0], "prune_scores[0]");
  const int num_layers = static_cast<int>(layers.size());
  const int num_targets = static_cast<int>(targets.size());
  const size_t bytes = prune_grow_workspace_bytes(score_type, layers.data(), num_layers, global_scope, num_targets,
                                                  refs.num_strides());
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, weights[0].options().dtype(at::kByte));
  const cudaError_t error = prune_grow_cuda(score_type, layers.data(), num_layers, n.data(), global_scope,
                                            targets.data(), num_targets, refs.strides(), refs.num_strides(),
                                            prune_abs, grow_abs, workspace.data_ptr(), bytes,
                                            c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == cudaSuccess, "sparsekern::prune_grow CUDA kernels failed: ", cudaGetErrorString(error));
  refs.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("prune_grow", &prune_grow); }

}  // namespace sparsekern::cuda
