// The float formats the CUDA kernels take, named without torch (the glue maps dtypes to these).
#pragma once

namespace sparsekern::cuda {

enum class FloatType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

}  // namespace sparsekern::cuda
