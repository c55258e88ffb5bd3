// sparse_linear on CPU: y = x @ W.T for a bitmap-packed W (layout: sparsekern/ops/packing.py).
// Each output feature walks its row's bitmap words and, per set bit, adds value * x[:, column];
// x is transposed first so the batch entries of one column are adjacent (a short vector loop over
// a tile of at most 16 batch entries, whose sums stay in registers).
// Rows of W are spread over threads with at::parallel_for; each thread owns its outputs, so the
// sums are deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/sparse_linear_checks.h"

namespace sparsekern {

SparseLinearShape check_sparse_linear_args(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
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
  std::vector<int64_t> y_shape = x.sizes().vec();
  y_shape.back() = bitmap.size(0);
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  return {in_features, bitmap.size(0), rows, std::move(y_shape)};
}

std::optional<at::Tensor> sparse_linear_without_products(const SparseLinearShape& shape, const at::Tensor& x,
                                                         const std::optional<at::Tensor>& bias) {
  if (shape.rows == 0 || shape.out_features == 0) return at::empty(shape.y_shape, x.options());
  if (shape.in_features == 0) {
    at::Tensor y = at::zeros(shape.y_shape, x.options());
    return bias.has_value() ? y.add_(*bias) : y;
  }
  return std::nullopt;
}

namespace {

// The packed layout's invariants that the kernel indexes by, checked on every call (a popcount per
// bitmap word: a few percent of the product): no bit past in_features (x has no such column), and
// chunk_offsets the running count of set bits with values holding one entry per bit (the kernel
// reads values from chunk_offsets[r, 0] on, one per bit). sparsekern.ops.PackedWeight checks the
// same once; this is for direct callers of the op and for tensors changed in place.
void check_packed_contents(const int32_t* bitmap, const int64_t* chunk_offsets, int64_t out_features,
                           int64_t in_features, int64_t words, int64_t chunks, int64_t nnz) {
  const int spare = static_cast<int>(in_features % 32);
  std::vector<int64_t> row_count(out_features);
  at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint32_t* row_bits = reinterpret_cast<const uint32_t*>(bitmap) + r * words;
      TORCH_CHECK_VALUE(spare == 0 || (row_bits[words - 1] >> spare) == 0u,
                        "bitmap marks columns past in_features=", in_features, " (row ", r, ")");
      const int64_t* offsets = chunk_offsets + r * chunks;
      int64_t count = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        // Modulo 2^64, so that no offset overflows; exact once offsets[0] matches the running
        // count below, which is at most the number of bits.
        TORCH_CHECK_VALUE(static_cast<uint64_t>(offsets[c]) == static_cast<uint64_t>(offsets[0]) + count,
                          "chunk_offsets disagree with bitmap: chunk_offsets[", r, ", ", c, "] is ", offsets[c],
                          " but chunk_offsets[", r, ", 0] is ", offsets[0], " and the bitmap marks ", count,
                          " entries between them");
        const int64_t last = std::min(words, (c + 1) * 32);
        for (int64_t w = c * 32; w < last; ++w) count += __builtin_popcount(row_bits[w]);
      }
      row_count[r] = count;
    }
  });
  int64_t marked = 0;
  for (int64_t r = 0; r < out_features; ++r) {
    TORCH_CHECK_VALUE(chunks == 0 || chunk_offsets[r * chunks] == marked, "chunk_offsets disagree with bitmap: ",
                      "chunk_offsets[", r, ", 0] is ", chunk_offsets[r * chunks], " but the bitmap marks ", marked,
                      " entries before row ", r);
    marked += row_count[r];
  }
  TORCH_CHECK_VALUE(marked == nnz, "values has ", nnz, " entries but bitmap marks ", marked);
}

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
  const SparseLinearShape shape = check_sparse_linear_args(x, bitmap, values, chunk_offsets, bias);
  const at::Tensor bitmap_c = bitmap.contiguous(), values_c = values.contiguous();
  const at::Tensor offsets_c = chunk_offsets.contiguous();
  const int64_t out_features = shape.out_features, words = bitmap.size(1), chunks = chunk_offsets.size(1);
  check_packed_contents(bitmap_c.data_ptr<int32_t>(), offsets_c.data_ptr<int64_t>(), out_features,
                        shape.in_features, words, chunks, values.numel());
  if (auto y = sparse_linear_without_products(shape, x, bias)) return *y;
  const int64_t rows = shape.rows;
  at::Tensor y = at::empty({rows, out_features}, x.options());
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_linear", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor x_t = x.reshape({rows, shape.in_features}).t().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    multiply_rows<scalar_t>(bitmap_c.data_ptr<int32_t>(), values_c.data_ptr<scalar_t>(),
                            offsets_c.data_ptr<int64_t>(), x_t.data_ptr<acc_t>(),
                            bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                            out_features, words, chunks, rows);
  });
  return y.view(shape.y_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("sparse_linear", &sparse_linear); }

}  // namespace sparsekern
