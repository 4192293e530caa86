// Weight-only int8/int4 linear layers for float32 activations on AVX2 + FMA.
//
// On CPUs without AVX-512 BF16 the engine runs in float32, where PyTorch's
// weight-only kernels are slower than the float32 matmul they replace (2-core EPYC,
// the demo model's 120 projections at one row: int8 107 ms, int4 161, float32 76;
// at 16 rows 2.3 s either way). Here each call streams the codes once: one row
// multiplies them straight from the register they were widened into; several rows
// share each block of codes widened to float32 in a buffer that stays in L1.
//
// The layouts are the ones quant.py keeps (x: float32 [M, K], contiguous):
//   int8: codes int8 [N, K], scales float32 [N]: w = code * scale (N a multiple of 8,
//         K of 16).
//   int4: PyTorch's packed CPU layout, [N / B][K][B / 2] bytes, byte (k, j) holding
//         channel j's code in its low nibble and channel j + B / 2's in its high one,
//         where PyTorch packs blocks of B = 64 channels on AVX-512 CPUs and 32 on
//         AVX2 ones; scales_zeros float32 [K / 32, N, 2]: w = (q - 8) * scale + zero
//         for each group of 32 inputs (N a multiple of B, K of 32).
// The result is float32 [M, N].
//
// Also here, for float32 or bf16: attention of a decode step's new tokens over the
// cache (`decode_attention`), one call per layer where PyTorch's fused SDPA took
// ~90 us at one row on this CPU, mostly its fixed cost.

#include <ATen/ATen.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "decode_attention_inputs.h"
#include "parallel_blocks.h"

namespace {

using tokenyard::parallel_blocks;

constexpr int64_t kGroup = 32;     // int4 inputs per scale and zero
constexpr int64_t kInt8Block = 8;   // int8 output channels per step

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// The 8 sums of 8 vectors in one vector: lane j = sum of v[j]'s lanes.
inline __m256 hsum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
  const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  // ab lanes: [v0 v1 v2 v3 | v0 v1 v2 v3] halves; cd the same for v4..v7.
  const __m256 lo = _mm256_permute2f128_ps(ab, cd, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(ab, cd, 0x31);
  return _mm256_add_ps(lo, hi);
}

// 8 int8 codes -> 8 float32.
inline __m256 widen8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weight ", k);
}

// out[m, n] = scale[n] * sum_k code[n, k] x[m, k], 8 channels at a time.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              "codes must be a contiguous 2-D int8 tensor");
  const int64_t n_out = codes.size(0), k = codes.size(1);
  check_x(x, k);
  TORCH_CHECK(k % 16 == 0 && n_out % kInt8Block == 0,
              "in_features must be a multiple of 16 and out_features of 8");
  TORCH_CHECK(scales.numel() == n_out && scales.scalar_type() == at::kFloat &&
                  scales.is_contiguous(),
              "scales must be float32, one per output channel");
  const int64_t m_rows = x.size(0);
  at::Tensor out = at::empty({m_rows, n_out}, x.options());
  if (m_rows == 0) return out;
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_blocks(n_out / kInt8Block, [&](int64_t begin, int64_t end) {
    // Several rows: the block's codes widened once, then read from L1 by every row.
    std::vector<float> tile(m_rows > 1 ? kInt8Block * k : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int8_t* block = cp + b * kInt8Block * k;
      const __m256 scale = _mm256_loadu_ps(sp + b * kInt8Block);
      if (m_rows == 1) {
        // One channel at a time, its codes one contiguous run: twice as fast from
        // memory as the 8 channels side by side (a 1728x576 layer, 180 against 360 us).
        __m256 acc[kInt8Block];
        for (int64_t j = 0; j < kInt8Block; ++j) {
          const int8_t* row = block + j * k;
          __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
          for (int64_t i = 0; i < k; i += 16) {
            even = _mm256_fmadd_ps(widen8(row + i), _mm256_loadu_ps(xp + i), even);
            odd = _mm256_fmadd_ps(widen8(row + i + 8), _mm256_loadu_ps(xp + i + 8), odd);
          }
          acc[j] = _mm256_add_ps(even, odd);
        }
        _mm256_storeu_ps(op + b * kInt8Block, _mm256_mul_ps(hsum8(acc), scale));
        continue;
      }
      for (int64_t j = 0; j < kInt8Block; ++j)
        for (int64_t i = 0; i < k; i += 8)
          _mm256_storeu_ps(tile.data() + j * k + i, widen8(block + j * k + i));
      for (int64_t m = 0; m < m_rows; ++m) {
        const float* xr = xp + m * k;
        __m256 acc[kInt8Block];
        for (auto& a : acc) a = _mm256_setzero_ps();
        for (int64_t i = 0; i < k; i += 8) {
          const __m256 xv = _mm256_loadu_ps(xr + i);
          for (int64_t j = 0; j < kInt8Block; ++j)
            acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(tile.data() + j * k + i), xv, acc[j]);
        }
        _mm256_storeu_ps(op + m * n_out + b * kInt8Block, _mm256_mul_ps(hsum8(acc), scale));
      }
    }
  });
  return out;
}

// out[m, n] = sum_k x[m, k] w[n, k] for float32 w [N, K] and a few rows of x: each
// channel's weights are read once, in order, and multiply every row (MKL's
// matrix-vector product read the demo model's float32 weights at 5-7 GB/s on a 2-core
// EPYC; this, at 1-4 rows, at what the memory gives).
template <int64_t Rows>
void dense_rows(const float* xp, const float* wp, float* op, int64_t n_out, int64_t k) {
  parallel_blocks(n_out, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* w = wp + n * k;
      __m256 acc[Rows][2];
      for (auto& row : acc) row[0] = row[1] = _mm256_setzero_ps();
      for (int64_t i = 0; i < k; i += 16) {
        const __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
        for (int64_t m = 0; m < Rows; ++m) {
          acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp + m * k + i), acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + m * k + i + 8), acc[m][1]);
        }
      }
      for (int64_t m = 0; m < Rows; ++m)
        op[m * n_out + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
    }
  });
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "weight must be a contiguous 2-D float32 tensor");
  const int64_t n_out = weight.size(0), k = weight.size(1), m_rows = x.size(0);
  check_x(x, k);
  TORCH_CHECK(k % 16 == 0, "in_features must be a multiple of 16");
  TORCH_CHECK(m_rows >= 1 && m_rows <= 4, "x must have 1 to 4 rows, not ", m_rows);
  at::Tensor out = at::empty({m_rows, n_out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  switch (m_rows) {
    case 1: dense_rows<1>(xp, wp, op, n_out, k); break;
    case 2: dense_rows<2>(xp, wp, op, n_out, k); break;
    case 3: dense_rows<3>(xp, wp, op, n_out, k); break;
    default: dense_rows<4>(xp, wp, op, n_out, k); break;
  }
  return out;
}

// The codes of one input of an int4 block of `BlockN` channels as BlockN / 8
// float32 vectors: the first half of the channels from the low nibbles, the second
// from the high ones, in order.
inline void widen_half(__m128i nibbles, __m256* q) {
  q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nibbles));
  q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(nibbles, 8)));
}

template <int64_t BlockN>
inline void widen_int4(const uint8_t* p, __m256* q) {
  const __m128i mask = _mm_set1_epi8(0x0f);
  constexpr int64_t kBytes = BlockN / 2, kHalf = BlockN / 16;  // vectors per nibble half
  for (int64_t c = 0; c < kBytes; c += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c));
    widen_half(_mm_and_si128(bytes, mask), q + c / 8);
    widen_half(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), q + kHalf + c / 8);
  }
}

// 8 channels' (scale, zero) pairs, [s0 z0 s1 z1 ...], as a vector of scales and one
// of zeros.
inline void scales_zeros8(const float* p, __m256* scale, __m256* zero) {
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
  // shuffle: [s0 s1 s4 s5 | s2 s3 s6 s7]; the 64-bit permute puts them in order.
  *scale = _mm256_castpd_ps(_mm256_permute4x64_pd(
      _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), 0xd8));
  *zero = _mm256_castpd_ps(_mm256_permute4x64_pd(
      _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), 0xd8));
}

// out += scale * (sum - 8 xs) + zero * xs: w = (q - 8) * scale + zero over a group
// whose codes times x sum to `sum` and whose x sum to xs.
template <int64_t kVecs>
inline void add_group(const float* sz, const __m256* sum, float xsum, __m256* out) {
  const __m256 xs = _mm256_set1_ps(xsum), xs8 = _mm256_set1_ps(8.0f * xsum);
  for (int64_t v = 0; v < kVecs; ++v) {
    __m256 scale, zero;
    scales_zeros8(sz + v * 16, &scale, &zero);
    out[v] = _mm256_fmadd_ps(scale, _mm256_sub_ps(sum[v], xs8), _mm256_fmadd_ps(xs, zero, out[v]));
  }
}

// out[0..32) += a group's 32 channels (sums of codes times x in `sum`, x's sum xsum).
inline void add_to(float* out, const float* sz, const __m256* sum, float xsum) {
  __m256 acc[4];
  for (int v = 0; v < 4; ++v) acc[v] = _mm256_loadu_ps(out + v * 8);
  add_group<4>(sz, sum, xsum, acc);
  for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + v * 8, acc[v]);
}

// One row of x against blocks [begin, end): the codes widened in registers.
template <int64_t BlockN>
void int4_one_row(const float* x, const float* xsum, const uint8_t* pp, const float* szp,
                  float* out, int64_t n_out, int64_t k, int64_t begin, int64_t end) {
  constexpr int64_t kVecs = BlockN / 8;
  for (int64_t b = begin; b < end; ++b) {
    const uint8_t* codes = pp + b * k * (BlockN / 2);
    const int64_t n0 = b * BlockN;
    __m256 acc[kVecs];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t g = 0; g < k / kGroup; ++g) {
      __m256 sum[kVecs];
      for (auto& s : sum) s = _mm256_setzero_ps();
      for (int64_t i = 0; i < kGroup; ++i) {
        const __m256 xv = _mm256_broadcast_ss(x + g * kGroup + i);
        __m256 q[kVecs];
        widen_int4<BlockN>(codes + (g * kGroup + i) * (BlockN / 2), q);
        for (int64_t v = 0; v < kVecs; ++v) sum[v] = _mm256_fmadd_ps(q[v], xv, sum[v]);
      }
      add_group<kVecs>(szp + (g * n_out + n0) * 2, sum, xsum[g], acc);
    }
    for (int64_t v = 0; v < kVecs; ++v) _mm256_storeu_ps(out + n0 + v * 8, acc[v]);
  }
}

template <int64_t BlockN>
void int4_blocks(const float* xp, const uint8_t* pp, const float* szp, float* op, int64_t m_rows,
                 int64_t n_out, int64_t k) {
  constexpr int64_t kVecs = BlockN / 8;
  const int64_t groups = k / kGroup;
  // Each row's sum over each group, for the offsets: w = q * scale + (zero - 8 scale).
  std::vector<float> xsum(m_rows * groups);
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      __m256 s = _mm256_setzero_ps();
      for (int64_t i = 0; i < kGroup; i += 8)
        s = _mm256_add_ps(s, _mm256_loadu_ps(xp + m * k + g * kGroup + i));
      xsum[m * groups + g] = hsum(s);
    }
  if (m_rows == 1) {
    parallel_blocks(n_out / BlockN, [&](int64_t begin, int64_t end) {
      int4_one_row<BlockN>(xp, xsum.data(), pp, szp, op, n_out, k, begin, end);
    });
    return;
  }
  parallel_blocks(n_out / BlockN, [&](int64_t begin, int64_t end) {
    // One group of the block widened to float32 codes once, read by every row.
    alignas(32) float tile[kGroup * BlockN];
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = pp + b * k * (BlockN / 2);
      const int64_t n0 = b * BlockN;
      for (int64_t m = 0; m < m_rows; ++m) std::fill_n(op + m * n_out + n0, BlockN, 0.0f);
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* codes = block + g * kGroup * (BlockN / 2);
        for (int64_t i = 0; i < kGroup; ++i) {
          __m256 q[kVecs];
          widen_int4<BlockN>(codes + i * (BlockN / 2), q);
          for (int64_t v = 0; v < kVecs; ++v) _mm256_store_ps(tile + i * BlockN + v * 8, q[v]);
        }
        // Two rows at a time over 32 channels: each load from the tile feeds two FMAs
        // (16 rows of the demo model's projections: 1.4x one row at a time).
        for (int64_t c = 0; c < BlockN; c += 32) {
          const float* sz = szp + (g * n_out + n0 + c) * 2;
          const float* t = tile + c;
          int64_t m = 0;
          for (; m + 1 < m_rows; m += 2) {
            const float* x0 = xp + m * k + g * kGroup;
            __m256 s0[4], s1[4];
            for (int v = 0; v < 4; ++v) s0[v] = s1[v] = _mm256_setzero_ps();
            for (int64_t i = 0; i < kGroup; ++i) {
              const __m256 a = _mm256_broadcast_ss(x0 + i);
              const __m256 b1 = _mm256_broadcast_ss(x0 + k + i);
              for (int v = 0; v < 4; ++v) {
                const __m256 w = _mm256_load_ps(t + i * BlockN + v * 8);
                s0[v] = _mm256_fmadd_ps(w, a, s0[v]);
                s1[v] = _mm256_fmadd_ps(w, b1, s1[v]);
              }
            }
            add_to(op + m * n_out + n0 + c, sz, s0, xsum[m * groups + g]);
            add_to(op + (m + 1) * n_out + n0 + c, sz, s1, xsum[(m + 1) * groups + g]);
          }
          for (; m < m_rows; ++m) {
            const float* xr = xp + m * k + g * kGroup;
            __m256 s0[4];
            for (auto& v : s0) v = _mm256_setzero_ps();
            for (int64_t i = 0; i < kGroup; ++i) {
              const __m256 a = _mm256_broadcast_ss(xr + i);
              for (int v = 0; v < 4; ++v)
                s0[v] = _mm256_fmadd_ps(_mm256_load_ps(t + i * BlockN + v * 8), a, s0[v]);
            }
            add_to(op + m * n_out + n0 + c, sz, s0, xsum[m * groups + g]);
          }
        }
      }
    }
  });
}

at::Tensor int4pack_linear(const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& scales_zeros, int64_t block_n) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be the contiguous uint8 int4 layout");
  TORCH_CHECK(block_n == 32 || block_n == 64, "block_n must be 32 or 64, not ", block_n);
  const int64_t n_out = packed.size(0), k = packed.size(1) * 2;
  check_x(x, k);
  TORCH_CHECK(k % kGroup == 0 && n_out % block_n == 0, "in_features must be a multiple of 32 ",
              "and out_features of ", block_n);
  TORCH_CHECK(scales_zeros.scalar_type() == at::kFloat && scales_zeros.is_contiguous() &&
                  scales_zeros.dim() == 3 && scales_zeros.size(0) == k / kGroup &&
                  scales_zeros.size(1) == n_out && scales_zeros.size(2) == 2,
              "scales_zeros must be contiguous float32 [in / 32, out, 2]");
  const int64_t m_rows = x.size(0);
  at::Tensor out = at::empty({m_rows, n_out}, x.options());
  if (m_rows == 0) return out;
  const auto run = block_n == 64 ? int4_blocks<64> : int4_blocks<32>;
  run(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), scales_zeros.data_ptr<float>(),
      out.data_ptr<float>(), m_rows, n_out, k);
  return out;
}

// 8 numbers of x's dtype -> 8 float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// One query head against the first `len` positions of one kv head: softmax(scale q.k) v.
template <typename T>
void attend(const T* q, const T* k, const T* v, int64_t len, int64_t hd, float scale,
            float* scores, float* acc, T* out) {
  float top = -INFINITY;
  for (int64_t j = 0; j < len; ++j) {
    __m256 dot = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8)
      dot = _mm256_fmadd_ps(load8(q + d), load8(k + j * hd + d), dot);
    scores[j] = hsum(dot) * scale;
    top = std::max(top, scores[j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j < len; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  for (int64_t d = 0; d < hd; d += 8) _mm256_storeu_ps(acc + d, _mm256_setzero_ps());
  for (int64_t j = 0; j < len; ++j) {
    const __m256 p = _mm256_set1_ps(scores[j]);
    for (int64_t d = 0; d < hd; d += 8)
      _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(p, load8(v + j * hd + d), _mm256_loadu_ps(acc + d)));
  }
  const float inv = 1.f / total;
  for (int64_t d = 0; d < hd; ++d) out[d] = static_cast<T>(acc[d] * inv);
}

template <typename T>
void decode_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const int64_t* lens, double scale, at::Tensor& out) {
  const int64_t rows = q.size(0), kv_heads = q.size(1), group = q.size(2), hd = q.size(3);
  const int64_t capacity = k.size(2), row_stride = q.stride(0);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  auto run = [&](int64_t begin, int64_t end) {
    std::vector<float> scores(capacity), acc(hd);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r = p / kv_heads, h = p % kv_heads;
      const int64_t cache_at = (r * kv_heads + h) * capacity * hd;
      for (int64_t i = 0; i < group; ++i) {
        const int64_t head = h * group + i;
        attend(qp + r * row_stride + head * hd, kp + cache_at, vp + cache_at, lens[r], hd,
               static_cast<float>(scale), scores.data(), acc.data(),
               op + (r * kv_heads * group + head) * hd);
      }
    }
  };
  // One row's few heads: a thread team costs more than it saves.
  if (rows == 1) {
    run(0, kv_heads);
  } else {
    parallel_blocks(rows * kv_heads, run);
  }
}

// Attention of one new token per row over its cached positions: row r's query heads
// q[r] ([kv_heads, group, head_dim], grouped under their kv head; rows may be strided) against positions
// 0..lengths[r]-1 of cache slot r (k, v: one layer's [slots, kv_heads, capacity,
// head_dim]). Sums in float32; the result [rows, kv_heads * group * head_dim] in q's
// dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "q must be float32 or bfloat16");
  const int64_t* lens = tokenyard::decode_attention_lengths(q, k, v, lengths);
  const int64_t rows = q.size(0), kv_heads = q.size(1), group = q.size(2), hd = q.size(3);
  TORCH_CHECK(hd % 8 == 0, "head_dim must be a multiple of 8");
  at::Tensor out = at::empty({rows, kv_heads * group * hd}, q.options());
  if (q.scalar_type() == at::kFloat) {
    decode_rows<float>(q, k, v, lens, scale, out);
  } else {
    decode_rows<at::BFloat16>(q, k, v, lens, scale, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(tokenyard_avx2, m) {
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def(
      "int4pack_linear(Tensor x, Tensor packed, Tensor scales_zeros, int block_n) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenyard_avx2, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4pack_linear", &int4pack_linear);
  m.impl("dense_linear", &dense_linear);
  m.impl("decode_attention", &decode_attention);
}
