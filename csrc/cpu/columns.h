// Element access in flat (row-major) order to tensors of any strides, without a contiguous copy of
// the tensor: a Column hands out runs of consecutive flat positions as plain arrays, pointing into
// the tensor when it is contiguous and gathered into (then scattered back from) a caller's buffer
// otherwise. Used by the CPU selection kernels, whose tie rule is defined in flat order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace sparsekern::cpu {

class Column {
 public:
  Column() = default;

  explicit Column(const at::Tensor& t) : data_(static_cast<char*>(t.data_ptr())), element_size_(t.element_size()) {
    contiguous_ = t.is_contiguous();
    if (contiguous_) return;
    // Merge dimensions that step through memory as one (channels-last (O, I, H, W) becomes
    // (O, I, H*W)), so that the walk below carries less often.
    for (int64_t d = 0; d < t.dim(); ++d) {
      if (t.size(d) == 1) continue;
      if (!sizes_.empty() && strides_.back() == t.stride(d) * t.size(d)) {
        sizes_.back() *= t.size(d);
        strides_.back() = t.stride(d);
      } else {
        sizes_.push_back(t.size(d));
        strides_.push_back(t.stride(d));
      }
    }
    if (sizes_.empty()) contiguous_ = true;  // one entry
  }

  bool contiguous() const { return contiguous_; }

  // Positions [begin, end) as an array: the tensor's own memory when contiguous, else `buffer`
  // filled with them.
  template <typename T>
  T* read(int64_t begin, int64_t end, T* buffer) const {
    if (contiguous_) return reinterpret_cast<T*>(data_) + begin;
    walk(begin, end, [&](int64_t i, int64_t offset) { buffer[i] = reinterpret_cast<const T*>(data_)[offset]; });
    return buffer;
  }

  // Stores an array that read() returned back into the tensor (nothing to do when it is the tensor).
  template <typename T>
  void write(int64_t begin, int64_t end, const T* values) const {
    if (contiguous_) return;
    walk(begin, end, [&](int64_t i, int64_t offset) { reinterpret_cast<T*>(data_)[offset] = values[i]; });
  }

  int64_t element_size() const { return element_size_; }

 private:
  // Calls visit(i, offset) for i in [0, end - begin): the flat position begin + i lives `offset`
  // elements from the data pointer.
  template <typename Visit>
  void walk(int64_t begin, int64_t end, const Visit& visit) const {
    const int64_t dims = static_cast<int64_t>(sizes_.size());
    std::vector<int64_t> index(dims);
    int64_t offset = 0;
    for (int64_t d = dims - 1, rest = begin; d >= 0; --d) {
      index[d] = rest % sizes_[d];
      offset += index[d] * strides_[d];
      rest /= sizes_[d];
    }
    const int64_t inner = dims - 1;
    for (int64_t i = 0; i < end - begin;) {
      const int64_t run = std::min(end - begin - i, sizes_[inner] - index[inner]);
      for (int64_t j = 0; j < run; ++j) visit(i + j, offset + j * strides_[inner]);
      i += run;
      index[inner] += run;
      offset += run * strides_[inner];
      for (int64_t d = inner; d > 0 && index[d] == sizes_[d]; --d) {
        offset += strides_[d - 1] - index[d] * strides_[d];
        index[d] = 0;
        ++index[d - 1];
      }
    }
  }

  char* data_ = nullptr;
  int64_t element_size_ = 0;
  bool contiguous_ = true;
  std::vector<int64_t> sizes_;
  std::vector<int64_t> strides_;
};

}  // namespace sparsekern::cpu
