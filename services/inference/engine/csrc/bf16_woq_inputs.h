// The inputs the bf16 weight-only kernels take (amx_woq.cpp, avx512_woq.cpp),
// checked once: x bf16 [M, K] contiguous, and the layouts quant.py keeps (int8 codes
// [N, K]; PyTorch's packed int4 layout with bf16 scales and zeros [K / 32, N, 2]).
// Each kernel adds the multiples of N and K it needs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace tokenyard {

inline void check_bf16_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous 2-D bfloat16 tensor");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weight ", k);
}

inline void check_int8_codes(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              "codes must be a contiguous 2-D int8 tensor");
}

// The packed int4 weight and its scales and zeros in groups of 32 inputs (K a
// multiple of 32 checked here).
inline void check_int4_bf16(const at::Tensor& packed, const at::Tensor& scales_zeros) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be the contiguous uint8 int4 layout");
  const int64_t n_out = packed.size(0), k = packed.size(1) * 2;
  TORCH_CHECK(k % 32 == 0, "in_features must be a multiple of 32");
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.is_contiguous() &&
                  scales_zeros.dim() == 3 && scales_zeros.size(0) == k / 32 &&
                  scales_zeros.size(1) == n_out && scales_zeros.size(2) == 2,
              "scales_zeros must be contiguous bfloat16 [in / 32, out, 2]");
}

}  // namespace tokenyard
