// bf16 layers on AVX-512 BF16 CPUs without AMX (AMD Zen 4 and 5): weight-only
// int8/int4, bf16 weights in a layout of our own (`pack_pairs`), and a decode
// step's attention.
//
// There the engine runs in bf16 and PyTorch's weight-only kernels unpack the weight
// again for every row of x: on a 2-core Zen 5 a 16-row decode step lost to bf16
// (int8 0.84x, int4 0.62x) and one row gained little (int4 1.01x). Here each call
// reads the codes once: every block of output channels is widened to bf16 (exact,
// the codes are small integers) into a buffer in L1 and every row of x multiplies it
// with VDPBF16PS (16 float32 sums of 32 products per instruction).
//
// The layouts are the ones quant.py keeps (x: bf16 [M, K], contiguous):
//   int8: codes int8 [N, K], scales bf16 [N]: w = code * scale (N a multiple of 32,
//         K of 32).
//   int4: PyTorch's packed CPU layout for AVX-512 CPUs, [N / 64][K][32] bytes, byte
//         (k, j) holding channel j's code in its low nibble and channel j + 32's in
//         its high one; scales_zeros bf16 [K / 32, N, 2]: w = (q - 8) * scale + zero
//         for each group of 32 inputs (N a multiple of 64, K of 32).
// The result is bf16 [M, N], sums in float32.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_woq_inputs.h"
#include "decode_attention_inputs.h"
#include "parallel_blocks.h"

namespace {

using tokenyard::parallel_blocks;

constexpr int64_t kChunk = 32;  // inputs per VDPBF16PS vector, and per int4 group
constexpr int64_t kRows = 4;   // rows of x per register block
constexpr int64_t kCols = 4;  // int8 channels per register block of `dots`

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

inline __m512bh load_bh(const void* p) { return as_bh(_mm512_loadu_si512(p)); }

// 32 int8 codes -> 32 bf16 (exact: small integers).
inline __m512i int8_bf16(const int8_t* codes) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// Channel groups ahead of the one being read whose weights a 1-row product
// prefetches: two measured best on a 49152x576 bf16 layer (2-core Zen 5, ~54 GB/s,
// oneDNN's ~52; without it 31).
constexpr int64_t kAhead = 2;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// One chunk of 32 inputs of `dots` into the sums `part`.
template <int64_t R, typename Load>
__attribute__((always_inline)) inline void dot_chunk(const at::BFloat16* x, const Load& load,
                                                     int64_t k, int64_t i,
                                                     __m512 (&part)[R][kCols]) {
  __m512bh wv[kCols];
  for (int64_t c = 0; c < kCols; ++c) wv[c] = as_bh(load(c, i));
  for (int64_t r = 0; r < R; ++r) {
    const __m512bh xv = load_bh(x + r * k + i);
    for (int64_t c = 0; c < kCols; ++c) part[r][c] = _mm512_dpbf16_ps(part[r][c], wv[c], xv);
  }
}

// Rows x channels dot products over k of bf16 x rows and weight rows (`load(c, i)`:
// channel c's 32 weights from input i, as bf16), each sum times its channel's scale
// (none: 1), into out (bf16, row stride n_out).
template <int64_t R, typename Load>
inline void dots(const at::BFloat16* x, const Load& load, const float* scale, int64_t k,
                 at::BFloat16* out, int64_t n_out) {
  // One row: each channel's sum split over two chains, even and odd chunks, so that
  // eight VDPBF16PS are in flight (four chains ran 1.6x slower from cache). Each
  // chain is named at compile time: indexed by a runtime parity, the sums lived on
  // the stack, a store and a load around every VDPBF16PS.
  constexpr int64_t kSplit = R == 1 ? 2 : 1;
  __m512 acc[kSplit][R][kCols];
  for (auto& half : acc)
    for (auto& row : half)
      for (auto& a : row) a = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kSplit * kChunk <= k; i += kSplit * kChunk) {
    dot_chunk<R>(x, load, k, i, acc[0]);
    if (kSplit == 2) dot_chunk<R>(x, load, k, i + kChunk, acc[kSplit - 1]);
  }
  if (i < k) dot_chunk<R>(x, load, k, i, acc[0]);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < kCols; ++c) {
      __m512 total = acc[0][r][c];
      if (kSplit == 2) total = _mm512_add_ps(total, acc[kSplit - 1][r][c]);
      const float sum = _mm512_reduce_add_ps(total);
      out[r * n_out + c] = static_cast<at::BFloat16>(scale ? sum * scale[c] : sum);
    }
}

// Several rows: channels in blocks of kPairBlock, the block's weights over all of k
// widened once into a buffer as [k / 2 input pairs][kPairVecs][16 channels x 2]
// bf16, and every kPairRows rows of x multiplied by it with each row's input pair
// broadcast, so each sum lands in its channel's lane (no horizontal sums).
constexpr int64_t kPairVecs = 2;
constexpr int64_t kPairBlock = 16 * kPairVecs;
constexpr int64_t kPairRows = 8;

// v[i] (16 dwords) <-> lane i of every v: a 16x16 transpose of dwords.
inline void transpose16(__m512i* v) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + e]: element e of each 128-bit lane, 4 rows
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i w0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xee);
    const __m512i w2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
    const __m512i w3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xee);
    v[e] = _mm512_shuffle_i32x4(w0, w2, 0x88);
    v[4 + e] = _mm512_shuffle_i32x4(w0, w2, 0xdd);
    v[8 + e] = _mm512_shuffle_i32x4(w1, w3, 0x88);
    v[12 + e] = _mm512_shuffle_i32x4(w1, w3, 0xdd);
  }
}

// A block's pair buffer from `load(c, i)` (channel c's 32 weights from input i, bf16).
template <typename Load>
void pair_tile(const Load& load, int64_t k, __m512i* tile) {
  for (int64_t i = 0; i < k; i += kChunk)
    for (int64_t v = 0; v < kPairVecs; ++v) {
      __m512i rows[16];
      for (int64_t c = 0; c < 16; ++c) rows[c] = load(v * 16 + c, i);
      transpose16(rows);
      for (int64_t p = 0; p < 16; ++p) _mm512_store_si512(tile + (i / 2 + p) * kPairVecs + v, rows[p]);
    }
}

// R rows of x (row stride k) against a block's pair buffer, each sum times its
// channel's scale (none: 1), into out (bf16, row stride n_out).
// `ahead`: a buffer (the next block's) to fetch into cache meanwhile, or null.
template <int64_t R>
void pair_rows(const at::BFloat16* x, const __m512i* tile, const float* scale, int64_t k,
               at::BFloat16* out, int64_t n_out, const __m512i* ahead) {
  __m512 acc[R][kPairVecs];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  const int32_t* xd = reinterpret_cast<const int32_t*>(x);
  for (int64_t p = 0; p < k / 2; ++p) {
    if (ahead != nullptr)
      for (int64_t v = 0; v < kPairVecs; ++v) prefetch(ahead + p * kPairVecs + v);
    __m512bh w[kPairVecs];
    for (int64_t v = 0; v < kPairVecs; ++v) w[v] = as_bh(_mm512_load_si512(tile + p * kPairVecs + v));
    for (int64_t r = 0; r < R; ++r) {
      const __m512bh xv = as_bh(_mm512_set1_epi32(xd[r * k / 2 + p]));
      for (int64_t v = 0; v < kPairVecs; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], w[v], xv);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < kPairVecs; ++v) {
      const __m512 sum = scale ? _mm512_mul_ps(acc[r][v], _mm512_loadu_ps(scale + v * 16)) : acc[r][v];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * n_out + v * 16),
                          (__m256i)_mm512_cvtneps_pbh(sum));
    }
}

// Every row of x ([m_rows, k]) against a block's pair buffer; the first row tile
// fetches `ahead` (the next block's buffer, or null) into cache meanwhile.
void pair_all_rows(const at::BFloat16* x, int64_t m_rows, const __m512i* tile, const float* scale,
                   int64_t k, at::BFloat16* out, int64_t n_out, const __m512i* ahead = nullptr) {
  int64_t m = 0;
  for (; m + kPairRows <= m_rows; m += kPairRows)
    pair_rows<kPairRows>(x + m * k, tile, scale, k, out + m * n_out, n_out, m == 0 ? ahead : nullptr);
  x += m * k;
  out += m * n_out;
  ahead = m == 0 ? ahead : nullptr;
  switch (m_rows - m) {
    case 7: pair_rows<7>(x, tile, scale, k, out, n_out, ahead); break;
    case 6: pair_rows<6>(x, tile, scale, k, out, n_out, ahead); break;
    case 5: pair_rows<5>(x, tile, scale, k, out, n_out, ahead); break;
    case 4: pair_rows<4>(x, tile, scale, k, out, n_out, ahead); break;
    case 3: pair_rows<3>(x, tile, scale, k, out, n_out, ahead); break;
    case 2: pair_rows<2>(x, tile, scale, k, out, n_out, ahead); break;
    case 1: pair_rows<1>(x, tile, scale, k, out, n_out, ahead); break;
    default: break;
  }
}

// Rows up to which a block streams its weights from memory once into `dots` (a
// horizontal sum per row and channel) rather than through the pair buffer.
constexpr int64_t kDotRows = 4;

// The weights of kPairBlock channels [n0, n0 + kPairBlock), by `load`, against every
// row: a few rows read them straight from memory; more, through the pair buffer.
template <typename Load>
void block_linear(const at::BFloat16* x, int64_t m_rows, const Load& load, const float* scale,
                  int64_t k, __m512i* tile, at::BFloat16* out, int64_t n_out) {
  if (m_rows > kDotRows) {
    pair_tile(load, k, tile);
    pair_all_rows(x, m_rows, tile, scale, k, out, n_out);
    return;
  }
  for (int64_t c0 = 0; c0 < kPairBlock; c0 += kCols) {
    const auto at = [&](int64_t c, int64_t i) { return load(c0 + c, i); };
    const float* s = scale ? scale + c0 : nullptr;
    switch (m_rows) {
      case 4: dots<4>(x, at, s, k, out + c0, n_out); break;
      case 3: dots<3>(x, at, s, k, out + c0, n_out); break;
      case 2: dots<2>(x, at, s, k, out + c0, n_out); break;
      default: dots<1>(x, at, s, k, out + c0, n_out); break;
    }
  }
}

// out[m, n] = scale[n] * sum_k code[n, k] x[m, k].
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  tokenyard::check_int8_codes(codes);
  const int64_t n_out = codes.size(0), k = codes.size(1);
  tokenyard::check_bf16_x(x, k);
  TORCH_CHECK(k % kChunk == 0 && n_out % kPairBlock == 0,
              "in_features must be a multiple of 32 and out_features of 32");
  TORCH_CHECK(scales.numel() == n_out && scales.scalar_type() == at::kBFloat16 &&
                  scales.is_contiguous(),
              "scales must be bfloat16, one per output channel");
  const int64_t m_rows = x.size(0);
  at::Tensor out = at::empty({m_rows, n_out}, x.options());
  if (m_rows == 0) return out;
  const int8_t* cp = codes.data_ptr<int8_t>();
  const at::BFloat16* sp = scales.data_ptr<at::BFloat16>();
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  parallel_blocks(n_out / kPairBlock, [&](int64_t begin, int64_t end) {
    std::vector<__m512i> tile(m_rows > kDotRows ? k / 2 * kPairVecs : 0);
    float scale[kPairBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kPairBlock;
      for (int64_t j = 0; j < kPairBlock; ++j) scale[j] = static_cast<float>(sp[n0 + j]);
      const int8_t* w = cp + n0 * k;
      block_linear(xp, m_rows, [&](int64_t c, int64_t i) {
                     prefetch(w + (c + kAhead * kCols) * k + i);
                     return int8_bf16(w + c * k + i);
                   }, scale, k, tile.data(), op + n0, n_out);
    }
  });
  return out;
}

// A bf16 weight [N, K] kept in the pair buffer's layout, block after block
// (`pack_pairs`): every row count then multiplies it as `pair_rows` does, with no
// transpose per call, and one row streams each thread's blocks as one sequential run.
at::Tensor pack_pairs(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "weight must be a contiguous 2-D bfloat16 tensor");
  const int64_t n_out = weight.size(0), k = weight.size(1);
  TORCH_CHECK(k % kChunk == 0 && n_out % kPairBlock == 0,
              "in_features must be a multiple of 32 and out_features of 32");
  at::Tensor packed = at::empty({n_out, k}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0, "unaligned allocation");
  const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
  __m512i* out = reinterpret_cast<__m512i*>(packed.data_ptr<at::BFloat16>());
  parallel_blocks(n_out / kPairBlock, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const at::BFloat16* w = wp + b * kPairBlock * k;
      pair_tile([&](int64_t c, int64_t i) { return _mm512_loadu_si512(w + c * k + i); }, k,
                out + b * (k / 2) * kPairVecs);
    }
  });
  return packed;
}

// out[m, n] = sum_k w[n, k] x[m, k] for a weight packed by `pack_pairs`.
at::Tensor pair_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0,
              "packed must be a weight packed by pack_pairs");
  const int64_t n_out = packed.size(0), k = packed.size(1), m_rows = x.size(0);
  tokenyard::check_bf16_x(x, k);
  TORCH_CHECK(k % kChunk == 0 && n_out % kPairBlock == 0,
              "in_features must be a multiple of 32 and out_features of 32");
  at::Tensor out = at::empty({m_rows, n_out}, x.options());
  if (m_rows == 0) return out;
  const __m512i* pp = reinterpret_cast<const __m512i*>(packed.data_ptr<at::BFloat16>());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  parallel_blocks(n_out / kPairBlock, [&](int64_t begin, int64_t end) {
    // Each block's weights are read from memory once, by its first row tile, which
    // fetches the next block's meanwhile (30 layers' projections, 2-core Zen 5: 64
    // rows took 21.5-22.3 ms from memory against 17.2 with the weights in cache).
    for (int64_t b = begin; b < end; ++b) {
      const __m512i* block = pp + b * (k / 2) * kPairVecs;
      pair_all_rows(xp, m_rows, block, nullptr, k, op + b * kPairBlock, n_out,
                    b + 1 < end ? block + (k / 2) * kPairVecs : nullptr);
    }
  });
  return out;
}

// int4. A group's codes q become bf16 128 + q (0x4300 | q: exact), so with
// D = sum x (128 + q) and X = sum x over the group,
//   x . w = scale * D + (zero - 136 * scale) * X.
constexpr int64_t kInt4Block = 64;  // channels per block of the packed layout
constexpr int64_t kVecs = kInt4Block / 16;

// 64 channels' scales and offsets (zero - 136 scale) of one group, from their
// (scale, zero) bf16 pairs read as dwords (scale in the low half).
inline void group_scales(const uint32_t* pairs, __m512* scale, __m512* offset) {
  for (int64_t v = 0; v < kVecs; ++v) {
    const __m512i sz = _mm512_loadu_si512(pairs + v * 16);
    scale[v] = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));
    const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(sz, _mm512_set1_epi32(-65536)));
    offset[v] = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), scale[v], zero);
  }
}

// One group of a 64-channel block as [16 input pairs][64 channels x 2] bf16: vector
// (p, v) holds channels 16v..16v+15, each as the pair (inputs 2p, 2p + 1). Inputs 2p
// and 2p + 1 are 64 adjacent bytes; one VPERMB per 16 channels puts each channel's
// two bytes in a dword, zero-extended to words, and the low or high nibble or'ed
// into bf16 128.0 gives 128 + q.
template <typename F>
inline void int4_pairs(const uint8_t* group, const F& f) {
  const __m512i nibble = _mm512_set1_epi16(0x0F);
  const __m512i magic = _mm512_set1_epi16(0x4300);
  // Word 2j of vector `half`: byte 16 half + j (input 2p), word 2j + 1: byte 32 + 16 half + j.
  alignas(64) uint8_t order[2][64];
  for (int half = 0; half < 2; ++half)
    for (int j = 0; j < 16; ++j) {
      order[half][4 * j] = static_cast<uint8_t>(16 * half + j);
      order[half][4 * j + 2] = static_cast<uint8_t>(32 + 16 * half + j);
      order[half][4 * j + 1] = order[half][4 * j + 3] = 0;
    }
  const __m512i idx0 = _mm512_load_si512(order[0]), idx1 = _mm512_load_si512(order[1]);
  constexpr __mmask64 kEvenBytes = 0x5555555555555555ULL;
  // Unrolled: `p` is a constant in `f`, so a callback's chains picked by its parity
  // stay in registers (see `dots`).
#pragma GCC unroll 16
  for (int64_t p = 0; p < kChunk / 2; ++p) {
    prefetch(group + kAhead * kChunk * 32 + p * 64);  // a group is 16 cache lines
    const __m512i rows = _mm512_loadu_si512(group + p * 64);
    const __m512i w0 = _mm512_maskz_permutexvar_epi8(kEvenBytes, idx0, rows);
    const __m512i w1 = _mm512_maskz_permutexvar_epi8(kEvenBytes, idx1, rows);
    const __m512i w[kVecs] = {
        _mm512_ternarylogic_epi32(w0, nibble, magic, 0xEA),  // (a & b) | c
        _mm512_ternarylogic_epi32(w1, nibble, magic, 0xEA),
        _mm512_or_si512(_mm512_srli_epi16(w0, 4), magic),
        _mm512_or_si512(_mm512_srli_epi16(w1, 4), magic),
    };
    f(p, w);
  }
}

inline void int4_group(const uint8_t* group, __m512i* tile) {
  int4_pairs(group, [&](int64_t p, const __m512i* w) {
    for (int64_t v = 0; v < kVecs; ++v) _mm512_store_si512(tile + p * kVecs + v, w[v]);
  });
}

// One row of x against 64-channel blocks [begin, end): each group's codes widened in
// registers and multiplied at once, two chains per vector (even and odd pairs).
void int4_one_row(const at::BFloat16* x, const float* xsum, const uint8_t* pp, const uint32_t* szp,
                  int64_t n_out, int64_t k, int64_t begin, int64_t end, at::BFloat16* out) {
  const int64_t groups = k / kChunk;
  const int32_t* xd = reinterpret_cast<const int32_t*>(x);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t n0 = b * kInt4Block;
    __m512 total[kVecs];
    for (auto& t : total) t = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 d[2][kVecs];
      for (auto& half : d)
        for (auto& a : half) a = _mm512_setzero_ps();
      int4_pairs(pp + (b * k + g * kChunk) * (kInt4Block / 2), [&](int64_t p, const __m512i* w) {
        const __m512bh xv = as_bh(_mm512_set1_epi32(xd[g * kChunk / 2 + p]));
        for (int64_t v = 0; v < kVecs; ++v) d[p % 2][v] = _mm512_dpbf16_ps(d[p % 2][v], as_bh(w[v]), xv);
      });
      __m512 scale[kVecs], offset[kVecs];
      group_scales(szp + g * n_out + n0, scale, offset);
      const __m512 xs = _mm512_set1_ps(xsum[g]);
      for (int64_t v = 0; v < kVecs; ++v)
        total[v] = _mm512_fmadd_ps(offset[v], xs,
                                   _mm512_fmadd_ps(scale[v], _mm512_add_ps(d[0][v], d[1][v]), total[v]));
    }
    for (int64_t v = 0; v < kVecs; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + n0 + v * 16),
                          (__m256i)_mm512_cvtneps_pbh(total[v]));
  }
}

// D for R rows (x at the group's first input, row stride k) against one group tile.
template <int64_t R>
inline void int4_sums(const at::BFloat16* x, int64_t k, const __m512i* tile, __m512* d) {
  // One row: two chains per vector (even and odd pairs), as in `dots`.
  constexpr int64_t kSplit = R == 1 ? 2 : 1;
  __m512 part[kSplit][R * kVecs];
  for (auto& half : part)
    for (auto& a : half) a = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < kChunk / 2; p0 += kSplit)
    for (int64_t s = 0; s < kSplit; ++s) {  // s: a constant once unrolled (see `dots`)
      const int64_t p = p0 + s;
      auto& acc = part[s];
      __m512bh w[kVecs];
      for (int64_t v = 0; v < kVecs; ++v) w[v] = as_bh(_mm512_load_si512(tile + p * kVecs + v));
      for (int64_t r = 0; r < R; ++r) {
        const __m512bh xv =
            as_bh(_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + r * k + 2 * p)));
        for (int64_t v = 0; v < kVecs; ++v)
          acc[r * kVecs + v] = _mm512_dpbf16_ps(acc[r * kVecs + v], w[v], xv);
      }
    }
  for (int64_t i = 0; i < R * kVecs; ++i)
    d[i] = kSplit == 2 ? _mm512_add_ps(part[0][i], part[kSplit - 1][i]) : part[0][i];
}

// acc[r] (64 float32) += scale * D + offset * X for R rows.
template <int64_t R>
inline void int4_rows(const at::BFloat16* x, int64_t k, const __m512i* tile, const __m512* scale,
                      const __m512* offset, const float* xsum, int64_t groups, float* acc) {
  __m512 d[R * kVecs];
  int4_sums<R>(x, k, tile, d);
  for (int64_t r = 0; r < R; ++r) {
    const __m512 xs = _mm512_set1_ps(xsum[r * groups]);
    for (int64_t v = 0; v < kVecs; ++v) {
      float* a = acc + r * kInt4Block + v * 16;
      _mm512_storeu_ps(a, _mm512_fmadd_ps(offset[v], xs,
                                          _mm512_fmadd_ps(scale[v], d[r * kVecs + v],
                                                          _mm512_loadu_ps(a))));
    }
  }
}

at::Tensor int4pack_linear(const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& scales_zeros) {
  tokenyard::check_int4_bf16(packed, scales_zeros);
  const int64_t n_out = packed.size(0), k = packed.size(1) * 2, groups = k / kChunk;
  tokenyard::check_bf16_x(x, k);
  TORCH_CHECK(n_out % kInt4Block == 0, "in_features must be a multiple of 32 and out_features of 64");
  const int64_t m_rows = x.size(0);
  at::Tensor out = at::empty({m_rows, n_out}, x.options());
  if (m_rows == 0) return out;
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint32_t* szp = reinterpret_cast<const uint32_t*>(scales_zeros.data_ptr<at::BFloat16>());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  // Each row's sum over each group: [M][groups] float32.
  std::vector<float> xsum(m_rows * groups);
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i v = _mm512_loadu_si512(xp + m * k + g * kChunk);
      const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
      const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
      xsum[m * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
  if (m_rows == 1) {
    parallel_blocks(n_out / kInt4Block, [&](int64_t begin, int64_t end) {
      int4_one_row(xp, xsum.data(), pp, szp, n_out, k, begin, end, op);
    });
    return out;
  }
  parallel_blocks(n_out / kInt4Block, [&](int64_t begin, int64_t end) {
    alignas(64) __m512i tile[kChunk / 2 * kVecs];
    std::vector<float> acc(m_rows * kInt4Block);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kInt4Block;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t g = 0; g < groups; ++g) {
        int4_group(pp + (b * k + g * kChunk) * (kInt4Block / 2), tile);
        __m512 scale[kVecs], offset[kVecs];
        group_scales(szp + g * n_out + n0, scale, offset);
        const at::BFloat16* xg = xp + g * kChunk;
        int64_t m = 0;
        for (; m + kRows <= m_rows; m += kRows)
          int4_rows<kRows>(xg + m * k, k, tile, scale, offset, xsum.data() + m * groups + g, groups,
                           acc.data() + m * kInt4Block);
        const float* xs = xsum.data() + m * groups + g;
        float* a = acc.data() + m * kInt4Block;
        switch (m_rows - m) {
          case 3: int4_rows<3>(xg + m * k, k, tile, scale, offset, xs, groups, a); break;
          case 2: int4_rows<2>(xg + m * k, k, tile, scale, offset, xs, groups, a); break;
          case 1: int4_rows<1>(xg + m * k, k, tile, scale, offset, xs, groups, a); break;
          default: break;
        }
      }
      for (int64_t m = 0; m < m_rows; ++m)
        for (int64_t v = 0; v < kVecs; ++v)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + m * n_out + n0 + v * 16),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(acc.data() + m * kInt4Block + v * 16)));
    }
  });
  return out;
}

// Attention of a decode step's new tokens over the cache, bf16, as avx2_woq.cpp's
// `decode_attention` (which was ~0.67 ms a layer for 64 rows of the demo model on a
// Zen 5, most of it a scalar exp and a horizontal sum per score): here each kv
// head's query heads share every key and value they read, q . k is two VDPBF16PS
// per 64 dimensions, and the softmax's exp is vectorised (`exp_ps`).
constexpr int64_t kMaxGroup = 8;  // query heads per kv head held in registers
constexpr int64_t kMaxDim = 256;  // head_dim held in registers (16 floats a vector)

// e^x for x <= 0 (scores minus their maximum), to float32's precision: x = n ln 2 + r,
// |r| <= ln 2 / 2, e^r by its Taylor polynomial to degree 7, scaled by 2^n.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 -> 16 float32.
inline __m512 widen_bf16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Lane t of the result: the sum of d[t]'s 16 lanes (16 dot products at once: 45
// shuffles and adds where 16 horizontal sums took ~130 instructions).
inline __m512 sum16(const __m512* d) {
  __m512 e[8], f[4];
  for (int t = 0; t < 8; ++t)  // each 128-bit lane: d[2t] and d[2t+1], two partials each
    e[t] = _mm512_add_ps(_mm512_unpacklo_ps(d[2 * t], d[2 * t + 1]),
                         _mm512_unpackhi_ps(d[2 * t], d[2 * t + 1]));
  for (int t = 0; t < 4; ++t) {  // each 128-bit lane: d[4t..4t+3], one partial each
    const __m512d a = _mm512_castps_pd(e[2 * t]), b = _mm512_castps_pd(e[2 * t + 1]);
    f[t] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 h01 = _mm512_add_ps(_mm512_shuffle_f32x4(f[0], f[1], 0x88),
                                   _mm512_shuffle_f32x4(f[0], f[1], 0xDD));
  const __m512 h23 = _mm512_add_ps(_mm512_shuffle_f32x4(f[2], f[3], 0x88),
                                   _mm512_shuffle_f32x4(f[2], f[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(h01, h23, 0x88), _mm512_shuffle_f32x4(h01, h23, 0xDD));
}

// The `group` query heads q (rows of hd, side by side) of one kv head against its
// first `len` cached keys and values (rows of hd): softmax(scale q.k) v into out.
// Scores for 16 positions at a time (`sum16`); the weights rounded to bf16 (as
// PyTorch's CPU flash attention rounds them before its product with v) and each two
// positions' values interleaved, so one VDPBF16PS adds both positions' terms.
// `scores`: group * len floats; `weights`: group * (len + 1) bf16 (scratch).
void attend_group(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v,
                  int64_t group, int64_t len, int64_t hd, float scale, float* scores,
                  uint16_t* weights, at::BFloat16* out, const at::BFloat16* next_k,
                  int64_t next_len) {
  const int64_t chunks = hd / kChunk;
  __m512bh qv[kMaxGroup][kMaxDim / kChunk];
  for (int64_t i = 0; i < group; ++i)
    for (int64_t c = 0; c < chunks; ++c) qv[i][c] = load_bh(q + i * hd + c * kChunk);
  float top[kMaxGroup];
  for (int64_t i = 0; i < group; ++i) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
      __m512 dot[16];
      for (int64_t t = 0; t < 16; ++t) {
        if (i == 0)  // the values' rows, read after the softmax
          for (int64_t c = 0; c < chunks; ++c) prefetch(v + (j + t) * hd + c * kChunk);
        dot[t] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c)
          dot[t] = _mm512_dpbf16_ps(dot[t], qv[i][c], load_bh(k + (j + t) * hd + c * kChunk));
      }
      const __m512 s = _mm512_mul_ps(sum16(dot), _mm512_set1_ps(scale));
      _mm512_storeu_ps(scores + i * len + j, s);
      best = _mm512_max_ps(best, s);
    }
    top[i] = _mm512_reduce_max_ps(best);
    for (; j < len; ++j) {
      __m512 dot = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c)
        dot = _mm512_dpbf16_ps(dot, qv[i][c], load_bh(k + j * hd + c * kChunk));
      const float score = _mm512_reduce_add_ps(dot) * scale;
      scores[i * len + j] = score;
      top[i] = std::max(top[i], score);
    }
  }
  const int64_t stride = len + 1;  // weights per head, padded to a whole pair
  float total[kMaxGroup];
  for (int64_t i = 0; i < group; ++i) {
    float* row = scores + i * len;
    uint16_t* w = weights + i * stride;
    const __m512 m = _mm512_set1_ps(top[i]);
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + j), m));
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    if (j < len) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (len - j)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(tail, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + j), m)));
      sum = _mm512_add_ps(sum, e);
      _mm256_mask_storeu_epi16(w + j, tail, (__m256i)_mm512_cvtneps_pbh(e));
    }
    w[len] = 0;  // the odd position's partner
    total[i] = _mm512_reduce_add_ps(sum);
  }
  // Values: positions j and j + 1 interleaved per dimension (VPUNPCK{L,H}WD: each
  // 128-bit lane's dims 0-3 in `lo`, 4-7 in `hi`), times the pair of weights.
  __m512 lo[kMaxGroup][kMaxDim / kChunk], hi[kMaxGroup][kMaxDim / kChunk];
  for (int64_t i = 0; i < group; ++i)
    for (int64_t c = 0; c < chunks; ++c) lo[i][c] = hi[i][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; j += 2) {
    if (next_k != nullptr && j + 1 < next_len)  // the next group's keys, two rows a step
      for (int64_t c = 0; c < 2 * chunks; ++c) prefetch(next_k + j * hd + c * kChunk);
    __m512bh vl[kMaxDim / kChunk], vh[kMaxDim / kChunk];
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i a = _mm512_loadu_si512(v + j * hd + c * kChunk);
      const __m512i b = j + 1 < len ? _mm512_loadu_si512(v + (j + 1) * hd + c * kChunk)
                                    : _mm512_setzero_si512();
      vl[c] = as_bh(_mm512_unpacklo_epi16(a, b));
      vh[c] = as_bh(_mm512_unpackhi_epi16(a, b));
    }
    for (int64_t i = 0; i < group; ++i) {
      const __m512bh p = as_bh(_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(weights + i * stride + j)));
      for (int64_t c = 0; c < chunks; ++c) {
        lo[i][c] = _mm512_dpbf16_ps(lo[i][c], vl[c], p);
        hi[i][c] = _mm512_dpbf16_ps(hi[i][c], vh[c], p);
      }
    }
  }
  for (int64_t i = 0; i < group; ++i) {
    const __m512 inv = _mm512_set1_ps(1.0f / total[i]);
    for (int64_t c = 0; c < chunks; ++c) {
      // lanes (lo.0, hi.0, lo.1, hi.1) hold dims 0-15, (lo.2, hi.2, lo.3, hi.3) 16-31
      const __m512 first = _mm512_shuffle_f32x4(lo[i][c], hi[i][c], 0x44);
      const __m512 second = _mm512_shuffle_f32x4(lo[i][c], hi[i][c], 0xEE);
      const __m512 d0 = _mm512_mul_ps(_mm512_shuffle_f32x4(first, first, 0xD8), inv);
      const __m512 d1 = _mm512_mul_ps(_mm512_shuffle_f32x4(second, second, 0xD8), inv);
      _mm512_storeu_si512(out + i * hd + c * kChunk, (__m512i)_mm512_cvtne2ps_pbh(d1, d0));
    }
  }
}

// Row r's query heads q[r] ([kv_heads, group, head_dim], each row's heads side by
// side; rows may be strided) against positions 0..lengths[r]-1 of cache slot r (k,
// v: one layer's [slots, kv_heads, capacity, head_dim]), all bf16; the result
// [rows, kv_heads * group * head_dim] bf16, sums in float32.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "q must be bfloat16");
  const int64_t* lens = tokenyard::decode_attention_lengths(q, k, v, lengths);
  const int64_t rows = q.size(0), kv_heads = q.size(1), group = q.size(2), hd = q.size(3);
  const int64_t capacity = k.size(2);
  TORCH_CHECK(hd % kChunk == 0 && hd <= kMaxDim, "head_dim must be a multiple of 32, at most ",
              kMaxDim);
  TORCH_CHECK(group >= 1 && group <= kMaxGroup, "at most ", kMaxGroup,
              " query heads per kv head, not ", group);
  at::Tensor out = at::empty({rows, kv_heads * group * hd}, q.options());
  const at::BFloat16* qp = q.data_ptr<at::BFloat16>();
  const at::BFloat16* kp = k.data_ptr<at::BFloat16>();
  const at::BFloat16* vp = v.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t row_stride = q.stride(0);
  auto run = [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * capacity);
    std::vector<uint16_t> weights(group * (capacity + 1));
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / kv_heads, h = w % kv_heads;
      const int64_t cache_at = (r * kv_heads + h) * capacity * hd;
      // Each group's keys and values are a few KB from memory, too short a stream for
      // the hardware prefetcher: the values and the next group's keys are fetched
      // ahead (64 rows of the demo model, 111 positions, 30 layers' caches: 0.37-0.47
      // ms a layer before, 0.21 after, 0.14-0.16 with the cache hot).
      const bool more = w + 1 < end;
      const int64_t next_r = (w + 1) / kv_heads, next_h = (w + 1) % kv_heads;
      attend_group(qp + r * row_stride + h * group * hd, kp + cache_at, vp + cache_at, group,
                   lens[r], hd, static_cast<float>(scale), scores.data(), weights.data(),
                   op + (r * kv_heads + h) * group * hd,
                   more ? kp + (next_r * kv_heads + next_h) * capacity * hd : nullptr,
                   more ? lens[next_r] : 0);
    }
  };
  if (rows == 1) {  // one row's few heads: a thread team costs more than it saves
    run(0, kv_heads);
  } else {
    parallel_blocks(rows * kv_heads, run);
  }
  return out;
}


// int8 and int4 with each call's activations quantised too: VPDPBUSD multiplies 64
// byte pairs per instruction into 16 int32 sums, twice VDPBF16PS's 32, and needs no
// widening of the codes to bf16 (what bounded int4 at one row and both at 16 rows).
// As llama.cpp does for its Q4/Q8 formats: each row of x is cut into blocks of 32
// inputs, each block quantised to int8 with its own scale (max |x| / 127).
//
// Layouts (quant.py's `VnniInt8` and `VnniInt4` build them from its int8/int4
// weights), in blocks of 16 output channels, a channel per int32 lane:
//   int8: [N / 16][K / 32][544 bytes] for each group of 32 inputs: eight vectors of
//         [16 channels][4 inputs], code + 128 (unsigned, as VPDPBUSD's first operand
//         must be), then each channel's bf16 scale for the group [16].
//   int4: [N / 16][K / 32][320 bytes] for each group of 32 inputs: four vectors of
//         [16 channels][4 bytes], byte j of vector s holding input 8s + j in its low
//         nibble and 8s + 4 + j in its high one, then bf16 [2][16]: each channel's
//         scale d and offset m, w = d * q + m (q in 0..15).
// With x ~ s * a per block (a int8) and A = sum a over the block:
//   int8: x . w = sum_groups scale * s * (sum (code + 128) a - 128 A)
//   int4: x . w = sum_groups s * (d * sum q a + m * A).
constexpr int64_t kVnniBlock = 32;     // inputs per activation scale and per int4 group
constexpr int64_t kVnniGroupBytes = 320;  // one int4 group of 16 channels
constexpr int64_t kVnniInt8GroupBytes = 544;  // one int8 group of 16 channels
constexpr int64_t kVnniMaxRows = 8;    // rows of x per register tile, up to 8 rows
// Past 8 rows, tiles of up to 4 rows and 3 channel blocks: 12 chains of VPDPBUSD, each
// broadcast of x serving 3 blocks. Against 8-row tiles of one block (2-core Zen 5,
// the demo model's four projections and int8 head, best of 15 interleaved): int8
// 1.22x and 1.26x at 64 rows, 1.44x and 1.34x at 12; int4 1.09x and 1.24x at 64,
// 1.43x and 1.33x at 12. At 8 rows one 8-row tile stayed faster for the head.
constexpr int64_t kVnniWideRows = 4, kVnniWideBlocks = 3;
constexpr int64_t kVnniAhead8 = 1024, kVnniAhead4 = 640;  // prefetch distances (bytes)

// x ([m_rows, k] bf16) quantised in blocks of 32: codes [m_rows, k], and per block its
// scale s and the block's sum A (as int32 and as s * A).
struct QuantizedX {
  std::vector<int8_t> codes;
  std::vector<float> scale;
  std::vector<int32_t> sum;
  std::vector<float> scaled_sum;
};

// Blocks [begin, end) of x into q.
void quantize_blocks(const at::BFloat16* x, int64_t begin, int64_t end, QuantizedX& q) {
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t i = begin; i < end; ++i) {
    const __m512 lo = widen_bf16(x + i * kVnniBlock), hi = widen_bf16(x + i * kVnniBlock + 16);
    const float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_and_ps(lo, sign_off), _mm512_and_ps(hi, sign_off)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));  // nearest, ties to even
    const __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q.codes.data() + i * kVnniBlock), _mm512_cvtsepi32_epi8(a));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q.codes.data() + i * kVnniBlock + 16), _mm512_cvtsepi32_epi8(b));
    q.scale[i] = amax / 127.0f;
    q.sum[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
    q.scaled_sum[i] = q.scale[i] * static_cast<float>(q.sum[i]);
  }
}

// Rows from which quantize_x splits its blocks across the thread team, rather than
// leave the other core idle (30 layers of int4 projections at 64 rows: 1.04x; int8
// unchanged within noise).
constexpr int64_t kQuantizeParallelRows = 8;

QuantizedX quantize_x(const at::BFloat16* x, int64_t m_rows, int64_t k) {
  const int64_t blocks = m_rows * k / kVnniBlock;
  QuantizedX q{std::vector<int8_t>(m_rows * k), std::vector<float>(blocks),
               std::vector<int32_t>(blocks), std::vector<float>(blocks)};
  if (m_rows < kQuantizeParallelRows) {
    quantize_blocks(x, 0, blocks, q);
  } else {
    parallel_blocks(blocks, [&](int64_t begin, int64_t end) { quantize_blocks(x, begin, end, q); });
  }
  return q;
}

inline __m512i broadcast4(const int8_t* p) {
  return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p));
}

// C blocks of 16 channels (`w` at the first, `stride` bytes apart) against R rows of
// quantised x from row m0, into out (bf16, row stride n_out) at the first channel.
template <int64_t C, int64_t R>
void int8_vnni_tile(const uint8_t* w, int64_t stride, const QuantizedX& q, int64_t m0, int64_t k,
                    at::BFloat16* out, int64_t n_out, const uint8_t* ahead) {
  const int64_t blocks = k / kVnniBlock;
  __m512 acc[C][R];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t g = 0; g < blocks; ++g) {
    __m512i dot[C][R];
    for (int64_t r = 0; r < R; ++r) {
      const __m512i start = _mm512_set1_epi32(-128 * q.sum[(m0 + r) * blocks + g]);
      for (int64_t c = 0; c < C; ++c) dot[c][r] = start;
    }
#pragma GCC unroll 8
    for (int64_t s = 0; s < kVnniBlock / 4; ++s) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t offset = c * stride + g * kVnniInt8GroupBytes + s * 64;
        const uint8_t* at = w + offset;
        prefetch(ahead + offset);
        const __m512i wv = _mm512_loadu_si512(at);
        for (int64_t r = 0; r < R; ++r)
          dot[c][r] = _mm512_dpbusd_epi32(dot[c][r], wv,
                                          broadcast4(q.codes.data() + (m0 + r) * k + g * kVnniBlock + 4 * s));
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const __m256i sb = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(w + c * stride + g * kVnniInt8GroupBytes + 512));
      const __m512 ws = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(sb), 16));
      for (int64_t r = 0; r < R; ++r) {
        const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(q.scale[(m0 + r) * blocks + g]));
        acc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[c][r]), s, acc[c][r]);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < R; ++r)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m0 + r) * n_out + c * 16),
                          (__m256i)_mm512_cvtneps_pbh(acc[c][r]));
}

template <int64_t C, int64_t R>
void int4_vnni_tile(const uint8_t* w, int64_t stride, const QuantizedX& q, int64_t m0, int64_t k,
                    at::BFloat16* out, int64_t n_out, const uint8_t* ahead) {
  const int64_t groups = k / kVnniBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[C][R];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[C][R];
    for (auto& row : dot)
      for (auto& d : row) d = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int64_t s = 0; s < 4; ++s) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t offset = c * stride + g * kVnniGroupBytes + s * 64;
        const uint8_t* at = w + offset;
        prefetch(ahead + offset);
        const __m512i v = _mm512_loadu_si512(at);
        const __m512i lo = _mm512_and_si512(v, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        for (int64_t r = 0; r < R; ++r) {
          const int8_t* a = q.codes.data() + (m0 + r) * k + g * kVnniBlock + 8 * s;
          dot[c][r] = _mm512_dpbusd_epi32(dot[c][r], lo, broadcast4(a));
          dot[c][r] = _mm512_dpbusd_epi32(dot[c][r], hi, broadcast4(a + 4));
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const __m512i dm = _mm512_loadu_si512(w + c * stride + g * kVnniGroupBytes + 256);
      const __m512 d = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(dm)), 16));
      const __m512 m = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(dm, 1)), 16));
      for (int64_t r = 0; r < R; ++r) {
        const int64_t at = (m0 + r) * groups + g;
        const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(q.scale[at]));
        acc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[c][r]), ds,
                                    _mm512_fmadd_ps(m, _mm512_set1_ps(q.scaled_sum[at]), acc[c][r]));
      }
    }
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < R; ++r)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m0 + r) * n_out + c * 16),
                          (__m256i)_mm512_cvtneps_pbh(acc[c][r]));
}

// The tile shapes a call uses: one row takes four channel blocks at once (four
// independent chains of VPDPBUSD), two or three rows two blocks, up to kVnniMaxRows
// rows one block, more rows kVnniWideBlocks blocks in tiles of kVnniWideRows, each
// block's codes reused from L1 by every row tile.
#define TOKENYARD_VNNI_TILE(TILE, C, R) \
  TILE<C, R>(w + b * stride, stride, q, m0, k, out + b * 16, n_out, ahead)

template <int64_t R, bool Int4>
inline void vnni_rows(const uint8_t* w, int64_t stride, const QuantizedX& q,
                      int64_t m0, int64_t k, at::BFloat16* out, int64_t n_out, int64_t b, int64_t c,
                      const uint8_t* ahead) {
  // c channel blocks from block b (`vnni_linear`'s `across` at most).
#define TOKENYARD_VNNI_CASE(C)                                                   \
  case C:                                                                        \
    if constexpr (Int4) TOKENYARD_VNNI_TILE(int4_vnni_tile, C, R);               \
    else TOKENYARD_VNNI_TILE(int8_vnni_tile, C, R);                              \
    break;
  switch (c) {
    TOKENYARD_VNNI_CASE(4)
    TOKENYARD_VNNI_CASE(3)
    TOKENYARD_VNNI_CASE(2)
    default: TOKENYARD_VNNI_CASE(1)
  }
#undef TOKENYARD_VNNI_CASE
}

template <bool Int4>
void vnni_linear(const uint8_t* w, int64_t stride, const QuantizedX& q,
                 int64_t m_rows, int64_t k, at::BFloat16* out, int64_t n_out) {
  const bool wide = m_rows > kVnniMaxRows;
  constexpr int64_t distance = Int4 ? kVnniAhead4 : kVnniAhead8;
  const int64_t max_rows = wide ? kVnniWideRows : kVnniMaxRows;
  const int64_t tiles = (m_rows + max_rows - 1) / max_rows;
  // channel blocks per tile
  const int64_t across = wide ? kVnniWideBlocks : m_rows == 1 ? 4 : m_rows < 4 ? 2 : 1;
  parallel_blocks(n_out / 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += across) {
      const int64_t c = std::min(across, end - b);
      for (int64_t t = 0; t < tiles; ++t) {  // rows split evenly over the tiles
        const int64_t m0 = t * m_rows / tiles, rows = (t + 1) * m_rows / tiles - m0;
        // What a tile fetches ahead, at each offset it reads: a few rows stream the
        // weights once, a little further along; more rows read them in their first
        // tile, which fetches the next blocks' (the other tiles find them in cache,
        // and fetch what they read: no branch in the loop, 3-5 % at one row).
        const uint8_t* here = w + b * stride;
        const uint8_t* ahead = !wide || (t == 0 && b + across >= end) ? here + distance
                               : t == 0                               ? here + across * stride
                                                                      : here;
        switch (rows) {
          case 8: vnni_rows<8, Int4>(w, stride, q, m0, k, out, n_out, b, c, ahead); break;
          case 7: vnni_rows<7, Int4>(w, stride, q, m0, k, out, n_out, b, c, ahead); break;
          case 6: vnni_rows<6, Int4>(w, stride, q, m0, k, out, n_out, b, c, ahead); break;
          case 5: vnni_rows<5, Int4>(w, stride, q, m0, k, out, n_out, b, c, ahead); break;
          case 4: vnni_rows<4, Int4>(w, stride, q, m0, k, out, n_out, b, c, ahead); break;
          case 3: vnni_rows<3, Int4>(w, stride, q, m0, k, out, n_out, b, c, ahead); break;
          case 2: vnni_rows<2, Int4>(w, stride, q, m0, k, out, n_out, b, c, ahead); break;
          default: vnni_rows<1, Int4>(w, stride, q, m0, k, out, n_out, b, c, ahead); break;
        }
      }
    }
  });
}
#undef TOKENYARD_VNNI_TILE

// x [M, K] bf16 against a weight in a VNNI layout ([N / 16, K / 32 * group_bytes]
// uint8): int8 (544 bytes a group) or int4 (320).
template <bool Int4>
at::Tensor vnni_entry(const at::Tensor& x, const at::Tensor& packed) {
  constexpr int64_t group_bytes = Int4 ? kVnniGroupBytes : kVnniInt8GroupBytes;
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(1) % group_bytes == 0,
              "packed must be the contiguous uint8 VNNI ", Int4 ? "int4" : "int8",
              " layout [out / 16, in / 32 * ", group_bytes, "]");
  const int64_t n_out = packed.size(0) * 16, k = packed.size(1) / group_bytes * kVnniBlock;
  tokenyard::check_bf16_x(x, k);
  const int64_t m_rows = x.size(0);
  at::Tensor out = at::empty({m_rows, n_out}, x.options());
  if (m_rows == 0) return out;
  const QuantizedX q = quantize_x(x.data_ptr<at::BFloat16>(), m_rows, k);
  vnni_linear<Int4>(packed.data_ptr<uint8_t>(), packed.size(1), q, m_rows, k,
                    out.data_ptr<at::BFloat16>(), n_out);
  return out;
}

at::Tensor int8_vnni_linear(const at::Tensor& x, const at::Tensor& packed) {
  return vnni_entry<false>(x, packed);
}

at::Tensor int4_vnni_linear(const at::Tensor& x, const at::Tensor& packed) {
  return vnni_entry<true>(x, packed);
}

// Rows `ids` of a weight in the VNNI int8 layout, dequantised to bf16 ([len(ids), K]):
// a tied embedding's lookup from its output head's codes, code * scale rounded once
// (the product in float32, then rounded to bf16). One call: a
// dozen indexing ops from Python took ~0.2 ms of a 4 ms one-row int4 step.
at::Tensor int8_vnni_embed(const at::Tensor& packed, const at::Tensor& ids) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(1) % kVnniInt8GroupBytes == 0,
              "packed must be the contiguous uint8 VNNI int8 layout [out / 16, in / 32 * ",
              kVnniInt8GroupBytes, "]");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "ids must be a contiguous 1-D int64 tensor");
  const int64_t channels = packed.size(0) * 16, groups = packed.size(1) / kVnniInt8GroupBytes;
  const int64_t n = ids.size(0), k = groups * kVnniBlock;
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < channels, "ids[", i, "] = ", ip[i], " is outside 0..",
                channels - 1);
  at::Tensor out = at::empty({n, k}, packed.options().dtype(at::kBFloat16));
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const uint8_t* base = packed.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lane = ip[i] % 16;
    const uint8_t* block = base + (ip[i] / 16) * packed.size(1);
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* group = block + g * kVnniInt8GroupBytes;
      at::BFloat16 scale_bits;
      std::memcpy(&scale_bits, group + 512 + 2 * lane, sizeof scale_bits);
      const float scale = static_cast<float>(scale_bits);
      for (int64_t s = 0; s < kVnniBlock / 4; ++s)
        for (int64_t j = 0; j < 4; ++j)
          op[i * k + g * kVnniBlock + 4 * s + j] = static_cast<at::BFloat16>(
              static_cast<float>(static_cast<int>(group[s * 64 + lane * 4 + j]) - 128) * scale);
    }
  }
  return out;
}

// A decode step's layers in one call: what the runner's Python loop issues per layer
// (four projections, rotary and cache writes, attention, two residual adds with
// RMSNorm, SiLU and a product: 13 op calls and their Python around them) cost ~1 ms
// of a one-row step on the demo model's 30 layers (2-core Zen 5, the same runner
// with and without it, interleaved: bf16 7.84 -> 6.94 ms, int4 4.85 -> 3.82), a
// fifth of int4's. Same ops in the same order as the loop, so
// the same numbers bit for bit; the fused ops (csrc/cpu_ops.cpp) through the
// dispatcher. Projection kinds, a weight each: `kPair` (`pack_pairs`),
// `kInt8Vnni`, `kInt4Vnni`.
enum ProjectionKind : int64_t { kPair = 0, kInt8Vnni = 1, kInt4Vnni = 2 };
constexpr int64_t kLayerTensors = 6;  // ln1, qkv, o, ln2, gate_up, down
constexpr int64_t kLayerProjections = 4;

// `kind` checked by decode_layers before its first layer.
at::Tensor project(const at::Tensor& x, const at::Tensor& weight, int64_t kind) {
  switch (kind) {
    case kPair: return pair_linear(x, weight);
    case kInt8Vnni: return int8_vnni_linear(x, weight);
    default: return int4_vnni_linear(x, weight);
  }
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> fused_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// x [rows, hidden] bf16, the step's residual stream (updated in place and returned:
// the last layer's output, before the final norm). weights: kLayerTensors a layer;
// kinds: the four projections' kinds a layer; cos, sin, rows: as rope_write_'s;
// k_cache, v_cache: [layers, slots, kv_heads, capacity, head_dim]; lengths, scale: as
// decode_attention's.
at::Tensor decode_layers(at::Tensor& x, at::TensorList weights, at::IntArrayRef kinds,
                         const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                         at::Tensor& v_cache, const at::Tensor& rows, const at::Tensor& lengths,
                         double scale, double eps, int64_t q_heads, int64_t kv_heads) {
  static const auto rms_norm = fused_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(
      "tokenyard_ops::rms_norm");
  static const auto add_rms_norm_ =
      fused_op<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "tokenyard_ops::add_rms_norm_");
  static const auto rope_write_ =
      fused_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                          at::Tensor&, const at::Tensor&, int64_t, int64_t)>(
          "tokenyard_ops::rope_write_");
  const int64_t layers = k_cache.dim() == 5 ? k_cache.size(0) : -1;
  TORCH_CHECK(layers >= 1 && v_cache.sizes() == k_cache.sizes(),
              "k_cache and v_cache must be [layers, slots, kv_heads, capacity, head_dim]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kLayerTensors,
              "weights must hold ", kLayerTensors, " tensors a layer, ", layers * kLayerTensors,
              " in all, not ", weights.size());
  TORCH_CHECK(static_cast<int64_t>(kinds.size()) == layers * kLayerProjections, "kinds must hold ",
              kLayerProjections, " a layer, ", layers * kLayerProjections, " in all");
  for (const int64_t kind : kinds)  // all before the first layer writes its cache rows
    TORCH_CHECK(kind == kPair || kind == kInt8Vnni || kind == kInt4Vnni, "kinds: ", kind,
                " is not a projection kind (0, 1 or 2)");
  TORCH_CHECK(q_heads > 0 && kv_heads > 0 && q_heads % kv_heads == 0,
              "q_heads must be a positive multiple of kv_heads");
  const int64_t n = x.size(0), hd = k_cache.size(4), group = q_heads / kv_heads;
  at::Tensor h = rms_norm.call(x, weights[0], eps);
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = weights.data() + i * kLayerTensors;
    const int64_t* kind = kinds.data() + i * kLayerProjections;
    at::Tensor k = k_cache.select(0, i), v = v_cache.select(0, i);
    const at::Tensor qkv = project(h, w[1], kind[0]);
    const at::Tensor q = rope_write_.call(qkv, cos, sin, k, v, rows, q_heads, kv_heads);
    const at::Tensor attn = decode_attention(q.view({n, kv_heads, group, hd}), k, v, lengths, scale);
    h = add_rms_norm_.call(x, project(attn, w[2], kind[1]), w[3], eps);
    const at::Tensor gate_up = project(h, w[4], kind[2]);
    const int64_t half = gate_up.size(1) / 2;
    const at::Tensor act = at::silu(gate_up.narrow(1, 0, half)).mul_(gate_up.narrow(1, half, half));
    const at::Tensor down = project(act, w[5], kind[3]);
    if (i + 1 < layers) {
      h = add_rms_norm_.call(x, down, weights[(i + 1) * kLayerTensors], eps);
    } else {
      x.add_(down);
    }
  }
  return x;
}

}  // namespace

TORCH_LIBRARY(tokenyard_avx512, m) {
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("int4pack_linear(Tensor x, Tensor packed, Tensor scales_zeros) -> Tensor");
  m.def("pack_pairs(Tensor weight) -> Tensor");
  m.def("pair_linear(Tensor x, Tensor packed) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor");
  m.def("int8_vnni_linear(Tensor x, Tensor packed) -> Tensor");
  m.def("int4_vnni_linear(Tensor x, Tensor packed) -> Tensor");
  m.def("int8_vnni_embed(Tensor packed, Tensor ids) -> Tensor");
  m.def(
      "decode_layers(Tensor(a!) x, Tensor[] weights, int[] kinds, Tensor cos, Tensor sin, "
      "Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor rows, Tensor lengths, float scale, "
      "float eps, int q_heads, int kv_heads) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(tokenyard_avx512, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4pack_linear", &int4pack_linear);
  m.impl("pack_pairs", &pack_pairs);
  m.impl("pair_linear", &pair_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("int8_vnni_linear", &int8_vnni_linear);
  m.impl("int4_vnni_linear", &int4_vnni_linear);
  m.impl("int8_vnni_embed", &int8_vnni_embed);
  m.impl("decode_layers", &decode_layers);
}
