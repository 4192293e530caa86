// The inputs every `decode_attention` kernel takes (avx2_woq.cpp, avx512_woq.cpp),
// checked once: row r's query heads q[r] ([kv_heads, group, head_dim], each row's
// heads side by side; rows may be strided) against positions 0..lengths[r]-1 of
// cache slot r (k, v: one layer's [slots, kv_heads, capacity, head_dim], contiguous,
// q's dtype). Each kernel adds what it needs of the dtype and the sizes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace tokenyard {

// Checks the inputs; returns the lengths (one per row, each in 1..capacity).
inline const int64_t* decode_attention_lengths(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1 && q.stride(2) == q.size(3) &&
                  q.stride(1) == q.size(2) * q.size(3),
              "q must be [rows, kv_heads, group, head_dim], each row's heads side by side");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.is_contiguous() && v.is_contiguous() &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k and v must be contiguous [slots, kv_heads, capacity, head_dim] of q's dtype");
  const int64_t rows = q.size(0), capacity = k.size(2);
  TORCH_CHECK(k.size(0) >= rows && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k and v must hold a slot per row, q's kv heads and head_dim");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == rows &&
                  lengths.is_contiguous(),
              "lengths must be int64, one per row");
  const int64_t* lens = lengths.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= capacity, "lengths[", r, "] = ", lens[r],
                " is outside 1..", capacity);
  return lens;
}

}  // namespace tokenyard
