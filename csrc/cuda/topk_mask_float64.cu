// topk_mask's device passes for float64 scores, a file of their own (see topk_mask_body.cuh).
#include "cuda/topk_mask_body.cuh"

namespace sparsekern::cuda::topk_mask_detail {

template cudaError_t TopkBody::operator()<radix::u64, radix::kFloat64Inf>() const;

}  // namespace sparsekern::cuda::topk_mask_detail
