// prune_grow's device passes for bfloat16 scores, a file of their own (see prune_grow_body.cuh).
#include "cuda/prune_grow_body.cuh"

namespace sparsekern::cuda::prune_grow_detail {

template cudaError_t PruneGrowBody::operator()<uint16_t, radix::kBFloat16Inf>() const;

}  // namespace sparsekern::cuda::prune_grow_detail
