// sparse_linear on CPU: y = x @ W.T for a bitmap-packed W (layout: sparsekern/ops/packing.py).
// Each output feature walks its row's bitmap words and, per set bit, adds value * x[:, column];
// x is transposed first so the batch entries of one column are adjacent (a short vector loop over
// a tile of at most 16 batch entries, whose sums stay in registers).
// Rows of W are spread over threads with at::parallel_for; each thread owns its outputs, so the
// sums are deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/sparse_linear_checks.h"

namespace sparsekern {

int64_t check_sparse_linear_args(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                                 const at::Tensor& chunk_offsets, const std::optional<at::Tensor>& bias) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   "x must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension, got shape ", x.sizes());
  TORCH_CHECK_TYPE(bitmap.scalar_type() == at::kInt, "bitmap must be int32, got ", bitmap.scalar_type());
  TORCH_CHECK_VALUE(bitmap.dim() == 2, "bitmap must be 2-D (out_features, words), got shape ", bitmap.sizes());
  const int64_t in_features = x.size(-1);
  const int64_t words = (in_features + 31) / 32;
  TORCH_CHECK_VALUE(bitmap.size(1) == words, "bitmap must have ", words, " words per row for in_features=",
                    in_features, ", got shape ", bitmap.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), "values has dtype ", values.scalar_type(),
                   " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1, "values must be 1-D, got shape ", values.sizes());
  TORCH_CHECK_TYPE(chunk_offsets.scalar_type() == at::kLong, "chunk_offsets must be int64, got ",
                   chunk_offsets.scalar_type());
  const int64_t chunks = (words + 31) / 32;
  TORCH_CHECK_VALUE(chunk_offsets.dim() == 2 && chunk_offsets.size(0) == bitmap.size(0) &&
                        chunk_offsets.size(1) == chunks,
                    "chunk_offsets must have shape (", bitmap.size(0), ", ", chunks, "), got ", chunk_offsets.sizes());
  std::vector<std::pair<const char*, const at::Tensor*>> on_device = {
      {"bitmap", &bitmap}, {"values", &values}, {"chunk_offsets", &chunk_offsets}};
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias has dtype ", bias->scalar_type(),
                     " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == bitmap.size(0), "bias must have shape (",
                      bitmap.size(0), ",), got ", bias->sizes());
    on_device.push_back({"bias", &*bias});
  }
  for (const auto& [name, t] : on_device) {
    TORCH_CHECK_VALUE(t->device() == x.device(), name, " is on ", t->device(), " but x is on ", x.device());
  }
  return in_features;
}

namespace {

// One tile of kBatch batch entries (starting at b0) for rows [begin, end) of W: the sums stay in
// a fixed-size array, so the compiler keeps them in registers and vectorizes the batch loop.
template <typename scalar_t, int kBatch>
void multiply_tile(const int32_t* bitmap, const scalar_t* values, const int64_t* chunk_offsets,
                   const at::opmath_type<scalar_t>* x_t, const scalar_t* bias, scalar_t* y,
                   int64_t out_features, int64_t words, int64_t chunks, int64_t rows, int64_t b0,
                   int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = std::min<int64_t>(kBatch, rows - b0);
  for (int64_t r = begin; r < end; ++r) {
    acc_t acc[kBatch] = {};
    int64_t index = chunk_offsets[r * chunks];
    const int32_t* row_bits = bitmap + r * words;
    for (int64_t w = 0; w < words; ++w) {
      uint32_t bits = static_cast<uint32_t>(row_bits[w]);
      while (bits != 0u) {
        const int64_t column = w * 32 + __builtin_ctz(bits);
        bits &= bits - 1u;
        const acc_t v = static_cast<acc_t>(values[index++]);
        const acc_t* x_column = x_t + column * rows + b0;
        if (batch == kBatch) {
          for (int b = 0; b < kBatch; ++b) acc[b] += v * x_column[b];
        } else {
          for (int b = 0; b < batch; ++b) acc[b] += v * x_column[b];
        }
      }
    }
    const acc_t shift = bias ? static_cast<acc_t>(bias[r]) : acc_t(0);
    for (int64_t b = 0; b < batch; ++b) y[(b0 + b) * out_features + r] = static_cast<scalar_t>(acc[b] + shift);
  }
}

template <typename scalar_t>
void multiply_rows(const int32_t* bitmap, const scalar_t* values, const int64_t* chunk_offsets,
                   const at::opmath_type<scalar_t>* x_t, const scalar_t* bias, scalar_t* y,
                   int64_t out_features, int64_t words, int64_t chunks, int64_t rows) {
  // Grain: enough rows per task that the scheduling cost stays small next to the row work.
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b0 = 0; b0 < rows; b0 += 16) {
      const int64_t batch = rows - b0;
      const auto run = [&](auto tile) {
        multiply_tile<scalar_t, decltype(tile)::value>(bitmap, values, chunk_offsets, x_t, bias, y, out_features,
                                                       words, chunks, rows, b0, begin, end);
      };
      if (batch == 1) run(std::integral_constant<int, 1>());
      else if (batch <= 4) run(std::integral_constant<int, 4>());
      else if (batch <= 8) run(std::integral_constant<int, 8>());
      else run(std::integral_constant<int, 16>());
    }
  });
}

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                         const at::Tensor& chunk_offsets, const std::optional<at::Tensor>& bias) {
  const int64_t in_features = check_sparse_linear_args(x, bitmap, values, chunk_offsets, bias);
  const int64_t out_features = bitmap.size(0);
  const at::Tensor x2 = x.reshape({-1, in_features});
  const int64_t rows = x2.size(0);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  if (rows == 0 || out_features == 0) return y.view(shape);
  const at::Tensor bitmap_c = bitmap.contiguous(), values_c = values.contiguous();
  const at::Tensor offsets_c = chunk_offsets.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_linear", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor x_t = x2.t().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    multiply_rows<scalar_t>(bitmap_c.data_ptr<int32_t>(), values_c.data_ptr<scalar_t>(),
                            offsets_c.data_ptr<int64_t>(), x_t.data_ptr<acc_t>(),
                            bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                            out_features, bitmap.size(1), chunk_offsets.size(1), rows);
  });
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("sparse_linear", &sparse_linear); }

}  // namespace sparsekern
