// Argument checks of the score ops (topk_mask, topk_mask_per_tensor, prune_grow) shared by their CPU
// kernels (csrc/cpu) and CUDA kernels (csrc/cuda/*_cuda.cpp), so a direct torch.ops call raises the
// same TypeError / ValueError on either device, before anything is written.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <string>
#include <vector>

namespace sparsekern {

// The score dtypes every backend accepts.
inline bool is_score_dtype(c10::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

// Every score tensor is float16, bfloat16, float32 or float64, and all share scores[0]'s dtype.
inline void check_score_dtypes(at::TensorList scores) {
  for (size_t i = 0; i < scores.size(); ++i) {
    const auto dtype = scores[i].scalar_type();
    TORCH_CHECK_TYPE(is_score_dtype(dtype), "scores[", i, "] must be float16, bfloat16, float32 or float64, got ", dtype);
    TORCH_CHECK_TYPE(dtype == scores[0].scalar_type(), "scores[", i, "] has dtype ", dtype,
                     " but scores[0] has ", scores[0].scalar_type());
  }
}

// k of one global selection: in [0, total entries of the list].
inline void check_global_k(at::TensorList scores, int64_t k) {
  int64_t total = 0;
  for (const at::Tensor& s : scores) total += s.numel();
  TORCH_CHECK_VALUE(0 <= k && k <= total, "k must be in [0, ", total, "], got ", k);
}

// k of per-tensor selections: one entry per tensor, each in [0, that tensor's entries].
inline void check_per_tensor_k(at::TensorList scores, at::IntArrayRef k) {
  TORCH_CHECK_VALUE(k.size() == scores.size(), "k has ", k.size(), " entries but scores has ",
                    scores.size(), " tensors");
  for (size_t i = 0; i < k.size(); ++i) {
    TORCH_CHECK_VALUE(0 <= k[i] && k[i] <= scores[i].numel(), "k[", i, "] must be in [0, ",
                      scores[i].numel(), "], got ", k[i]);
  }
}

// prune_grow's arguments (schema in csrc/ops.cpp), with each tensor's name for errors.
struct PruneGrowArguments {
  // In the order of the schema, as each device's kernel receives them.
  PruneGrowArguments(at::TensorList weights, at::TensorList masks, at::TensorList prune_scores,
                     at::TensorList grow_scores, at::IntArrayRef n, bool global_scope, at::TensorList state,
                     at::IntArrayRef state_layers, at::TensorList masked, at::IntArrayRef masked_layers,
                     at::OptionalIntArrayRef active, at::TensorList new_masks)
      : weights(weights), masks(masks), prune_scores(prune_scores), grow_scores(grow_scores), n(n),
        global_scope(global_scope), state(state), state_layers(state_layers), masked(masked),
        masked_layers(masked_layers), active(active ? c10::optional<at::IntArrayRef>(*active) : c10::nullopt),
        new_masks(new_masks) {}

  at::TensorList weights, masks, prune_scores, grow_scores;
  at::IntArrayRef n;
  bool global_scope;
  at::TensorList state;
  at::IntArrayRef state_layers;
  at::TensorList masked;
  at::IntArrayRef masked_layers;
  c10::optional<at::IntArrayRef> active;
  at::TensorList new_masks;

  int64_t layers() const { return static_cast<int64_t>(weights.size()); }
  int64_t segments() const { return global_scope ? 1 : layers(); }

  // The messages of sparsekern.ops.reference.check_swap.
  std::string n_name(int64_t segment) const { return global_scope ? "n" : "n[" + std::to_string(segment) + "]"; }
  std::string active_name(int64_t segment) const {
    return global_scope ? "active" : "active[" + std::to_string(segment) + "]";
  }
  std::string owner(int64_t segment) const {
    return global_scope ? "the masks have" : "masks[" + std::to_string(segment) + "] has";
  }
};

inline std::string indexed(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

inline void check_float_like(const at::Tensor& t, const std::string& name, const at::Tensor& weight,
                             const std::string& weight_name) {
  TORCH_CHECK_TYPE(is_score_dtype(t.scalar_type()), name, " must be float16, bfloat16, float32 or float64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == weight.sizes(), name, " must have the shape of ", weight_name, " ", weight.sizes(),
                    ", got ", t.sizes());
}

inline bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  const auto status = at::get_overlap_status(a, b);
  return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
}

inline bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         a.strides() == b.strides();
}

// Types, shapes, list lengths, the counts the host knows (n against each segment's size and against
// `active` when given) and memory: a tensor written in place overlaps neither itself nor any other
// written tensor or mask, and a score shares memory with a written tensor only by being that very
// tensor of its own layer. `on_device` checks each tensor's device. Counting the masks is the kernels'.
template <typename OnDevice>
void check_prune_grow(const PruneGrowArguments& a, const OnDevice& on_device) {
  const int64_t layers = a.layers();
  TORCH_CHECK_VALUE(static_cast<int64_t>(a.masks.size()) == layers && static_cast<int64_t>(a.prune_scores.size()) == layers &&
                        static_cast<int64_t>(a.grow_scores.size()) == layers,
                    "weights, masks, prune_scores and grow_scores must have one entry per layer, got ",
                    a.weights.size(), ", ", a.masks.size(), ", ", a.prune_scores.size(), " and ", a.grow_scores.size());
  std::vector<std::pair<std::string, at::Tensor>> written;  // with each tensor's layer in `written_layer`
  std::vector<int64_t> written_layer;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor& weight = a.weights[l];
    const std::string weight_name = indexed("weights", l);
    check_float_like(weight, weight_name, weight, weight_name);
    TORCH_CHECK_TYPE(a.masks[l].scalar_type() == at::kBool, indexed("masks", l), " must be a bool tensor, got ",
                     a.masks[l].scalar_type());
    TORCH_CHECK_VALUE(a.masks[l].sizes() == weight.sizes(), indexed("masks", l), " must have the shape of ",
                      weight_name, " ", weight.sizes(), ", got ", a.masks[l].sizes());
    check_float_like(a.prune_scores[l], indexed("prune_scores", l), weight, weight_name);
    check_float_like(a.grow_scores[l], indexed("grow_scores", l), weight, weight_name);
    for (const auto* scores : {&a.prune_scores, &a.grow_scores}) {
      const char* kind = scores == &a.prune_scores ? "prune_scores" : "grow_scores";
      TORCH_CHECK_TYPE((*scores)[l].scalar_type() == a.prune_scores[0].scalar_type(), indexed(kind, l),
                       " has dtype ", (*scores)[l].scalar_type(), " but prune_scores[0] has ",
                       a.prune_scores[0].scalar_type(), ": every score must share one dtype");
    }
    for (const auto& [name, t] : {std::pair{weight_name, weight}, std::pair{indexed("masks", l), a.masks[l]},
                                  std::pair{indexed("prune_scores", l), a.prune_scores[l]},
                                  std::pair{indexed("grow_scores", l), a.grow_scores[l]}}) {
      on_device(t, name);
    }
    written.emplace_back(weight_name, weight);
    written_layer.push_back(l);
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(a.new_masks.size()) == layers, "new_masks must have one entry per layer, got ",
                    a.new_masks.size());
  for (int64_t l = 0; l < layers; ++l) {
    const std::string name = indexed("new_masks", l);
    TORCH_CHECK_TYPE(a.new_masks[l].scalar_type() == at::kBool, name, " must be a bool tensor, got ",
                     a.new_masks[l].scalar_type());
    TORCH_CHECK_VALUE(a.new_masks[l].sizes() == a.weights[l].sizes() && a.new_masks[l].is_contiguous(), name,
                      " must be a contiguous tensor of shape ", a.weights[l].sizes());
    on_device(a.new_masks[l], name);
    written.emplace_back(name, a.new_masks[l]);
    written_layer.push_back(l);
  }
  for (const auto* extra : {&a.state, &a.masked}) {
    const bool is_state = extra == &a.state;
    const at::IntArrayRef owners = is_state ? a.state_layers : a.masked_layers;
    const char* kind = is_state ? "state" : "masked";
    TORCH_CHECK_VALUE(owners.size() == extra->size(), kind, " has ", extra->size(), " tensors but ", kind,
                      "_layers has ", owners.size(), " entries");
    for (size_t i = 0; i < extra->size(); ++i) {
      const std::string name = indexed(kind, i);
      TORCH_CHECK_VALUE(0 <= owners[i] && owners[i] < layers, kind, "_layers[", i, "] must be in [0, ", layers,
                        "), got ", owners[i]);
      check_float_like((*extra)[i], name, a.weights[owners[i]], indexed("weights", owners[i]));
      on_device((*extra)[i], name);
      written.emplace_back(name, (*extra)[i]);
      written_layer.push_back(owners[i]);
    }
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(a.n.size()) == a.segments(), "n must have ", a.segments(),
                    a.global_scope ? " entry (global scope)" : " entries, one per layer", ", got ", a.n.size());
  if (a.active) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(a.active->size()) == a.segments(), "active must have ", a.segments(),
                      " entries like n, got ", a.active->size());
  }
  for (int64_t s = 0; s < a.segments(); ++s) {
    int64_t size = 0;
    for (int64_t l = a.global_scope ? 0 : s; l < (a.global_scope ? layers : s + 1); ++l) size += a.weights[l].numel();
    const int64_t bound = a.active ? (*a.active)[s] : size;
    if (a.active) {
      TORCH_CHECK_VALUE(0 <= bound && bound <= size, a.active_name(s), " must be in [0, ", size, "], got ", bound);
    }
    TORCH_CHECK_VALUE(0 <= a.n[s] && a.n[s] <= bound, a.n_name(s), " must be in [0, ", bound, "], got ", a.n[s]);
  }
  for (const auto& [name, t] : written) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                      " has entries that share memory (an expanded or stride-0 view), so it cannot be written in place");
  }
  // Only tensors on one storage can share memory: compare within each storage, not all pairs.
  struct Item {
    const void* storage;
    std::string name;
    const at::Tensor* tensor;
    int64_t layer;
    int role;  // 0 written, 1 mask, 2 score
  };
  std::vector<Item> items;
  for (size_t i = 0; i < written.size(); ++i) {
    items.push_back({written[i].second.storage().unsafeGetStorageImpl(), written[i].first, &written[i].second,
                     written_layer[i], 0});
  }
  for (int64_t l = 0; l < layers; ++l) {
    items.push_back({a.masks[l].storage().unsafeGetStorageImpl(), indexed("masks", l), &a.masks[l], l, 1});
    items.push_back({a.prune_scores[l].storage().unsafeGetStorageImpl(), indexed("prune_scores", l),
                     &a.prune_scores[l], l, 2});
    items.push_back({a.grow_scores[l].storage().unsafeGetStorageImpl(), indexed("grow_scores", l),
                     &a.grow_scores[l], l, 2});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.storage < y.storage; });
  for (size_t i = 0; i < items.size(); ++i) {
    for (size_t j = i + 1; j < items.size() && items[j].storage == items[i].storage; ++j) {
      const Item* x = &items[i];
      const Item* y = &items[j];
      if (x->role != 0 && y->role != 0) continue;  // read-only tensors may share memory
      if (x->role != 0) std::swap(x, y);           // x is written
      if (!shares_memory(*x->tensor, *y->tensor)) continue;
      const bool own_score = y->role == 2 && x->layer == y->layer && same_view(*x->tensor, *y->tensor);
      TORCH_CHECK_VALUE(own_score, x->name, " and ", y->name, " share memory, and ", x->name,
                        " is written in place (a score may only be its own layer's written tensor itself)");
    }
  }
}

}  // namespace sparsekern
