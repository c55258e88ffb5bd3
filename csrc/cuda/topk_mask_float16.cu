// topk_mask's device passes for float16 scores, a file of their own (see topk_mask_body.cuh).
#include "cuda/topk_mask_body.cuh"

namespace sparsekern::cuda::topk_mask_detail {

template cudaError_t TopkBody::operator()<uint16_t, radix::kFloat16Inf>() const;

}  // namespace sparsekern::cuda::topk_mask_detail
