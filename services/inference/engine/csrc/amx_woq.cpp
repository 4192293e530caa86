// Weight-only int8/int4 linear layers on AMX (bf16 tiles), for bf16 activations.
//
// PyTorch's CPU weight-only kernels unpack the weight again for every row of x, so
// a 16-row decode step costs several times a 1-row one and loses to bf16. Here each
// block of 16 output channels is unpacked to bf16 once per call, into a buffer
// that stays in L1/L2, and every 16 rows of x multiply it with AMX tile
// instructions (TDPBF16PS: 16x16 outputs, 32 inputs deep, float32 accumulation).
//
// The kernels read the layouts quant.py already keeps (x: bf16 [M, K], contiguous):
//   int8: codes int8 [N, K], scales [N]: w = code * scale (N a multiple of 16).
//   int4: PyTorch's packed CPU layout, described above `int4pack_linear`
//         (N a multiple of 64).
// K is a multiple of 32 in both; the result is bf16 [M, N].

#include <ATen/ATen.h>
#include <omp.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bf16_woq_inputs.h"
#include "parallel_blocks.h"

namespace {

using tokenyard::parallel_blocks;

constexpr int64_t kChunk = 32;  // inputs per tile step (one int4 group)
constexpr int64_t kBlock = 16;  // output channels per tile, and rows of x per tile

// 16 bf16 -> 16 float32 (bf16 is float32's upper half).
inline __m512 widen(__m256i bf16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0 and 3 = C (16 channels x `m` rows of x, float32; even and odd chunks,
// two chains so one tile's TDPBF16PS need not wait for the last), 1 and 4 = A (16
// channels x 32 inputs, bf16), 2 and 5 = B (16 input pairs x `m` rows, bf16 pairs).
void configure(int64_t m) {
  TileConfig cfg;
  const uint16_t pairs = static_cast<uint16_t>(4 * m);
  cfg.rows[0] = cfg.rows[3] = kBlock;
  cfg.colsb[0] = cfg.colsb[3] = pairs;
  cfg.rows[1] = cfg.rows[4] = kBlock;
  cfg.colsb[1] = cfg.colsb[4] = 64;
  cfg.rows[2] = cfg.rows[5] = kChunk / 2;
  cfg.colsb[2] = cfg.colsb[5] = pairs;
  _tile_loadconfig(&cfg);
}

// Tiles 0 and 3 = C (`m` rows of x x 16 channels, float32), 1 and 4 = A (`m` rows
// x 32 inputs, bf16), 2 and 5 = B (16 input pairs x 16 channels, bf16 pairs).
void configure_xa(int64_t m) {
  TileConfig cfg;
  cfg.rows[0] = cfg.rows[3] = static_cast<uint8_t>(m);
  cfg.colsb[0] = cfg.colsb[3] = 64;
  cfg.rows[1] = cfg.rows[4] = static_cast<uint8_t>(m);
  cfg.colsb[1] = cfg.colsb[4] = 64;
  cfg.rows[2] = cfg.rows[5] = kChunk / 2;
  cfg.colsb[2] = cfg.colsb[5] = 64;
  _tile_loadconfig(&cfg);
}

bool request_amx() {
  constexpr int kReqXcompPerm = 0x1023;
  constexpr int kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
}

inline void int8_row(const int8_t* codes, at::BFloat16* dst) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // exact: small integers
}

// 16 channels of codes (rows of `k` inputs) -> dst [chunk][channel][32] bf16.
void convert_int8(const int8_t* __restrict codes, int64_t k, at::BFloat16* __restrict dst) {
  for (int64_t j = 0; j < kBlock; ++j)
    for (int64_t c = 0; c < k / kChunk; ++c)
      int8_row(codes + j * k + c * kChunk, dst + (c * kBlock + j) * kChunk);
}

// x [M, K] -> per block of 16 rows, per chunk of 32 inputs, [16 pairs][16 rows]
// dwords (a pair = inputs 2p, 2p+1 of one row); rows past M are left unset.
std::vector<uint32_t> interleave(const at::BFloat16* x, int64_t m_rows, int64_t k) {
  const int64_t chunks = k / kChunk, blocks = (m_rows + kBlock - 1) / kBlock;
  std::vector<uint32_t> out(blocks * chunks * (kChunk / 2) * kBlock);
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                           5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(kBlock));
  for (int64_t m = 0; m < m_rows; ++m) {
    uint32_t* base = out.data() + (m / kBlock) * chunks * (kChunk / 2) * kBlock + m % kBlock;
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i pairs = _mm512_loadu_si512(x + m * k + c * kChunk);
      _mm512_i32scatter_epi32(base + c * (kChunk / 2) * kBlock, rows, pairs, 4);
    }
  }
  return out;
}

void check(const at::Tensor& x, int64_t n_out, int64_t k) {
  tokenyard::check_bf16_x(x, k);
  TORCH_CHECK(k % kChunk == 0 && n_out % kBlock == 0,
              "in_features must be a multiple of 32 and out_features of 16");
}

// out[m, n] = sum_k x[m, k] code[n, k] * scale[n]: the codes are the A tile (16
// channels x 32 inputs, exact in bf16), x the B tile, interleaved once per call.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  tokenyard::check_int8_codes(codes);
  const int64_t n_out = codes.size(0), k = codes.size(1), chunks = k / kChunk;
  check(x, n_out, k);
  TORCH_CHECK(scales.numel() == n_out, "one scale per output channel");
  const at::Tensor post_scales = scales.to(at::kFloat).contiguous();
  const float* post = post_scales.data_ptr<float>();
  const int8_t* cp = codes.data_ptr<int8_t>();
  const int64_t m_rows = x.size(0);
  at::Tensor out = at::empty({m_rows, n_out}, x.options());
  if (m_rows == 0) return out;
  const std::vector<uint32_t> xv = interleave(x.data_ptr<at::BFloat16>(), m_rows, k);
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  parallel_blocks(n_out / kBlock, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> w(chunks * kBlock * kChunk);
    alignas(64) float acc[kBlock * kBlock];
    alignas(64) float odd[kBlock * kBlock];
    int64_t configured = -1;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kBlock;
      convert_int8(cp + n0 * k, k, w.data());
      for (int64_t m0 = 0; m0 < m_rows; m0 += kBlock) {
        const int64_t rows = std::min(kBlock, m_rows - m0);
        if (rows != configured) {
          configure(rows);
          configured = rows;
        }
        const uint32_t* xb = xv.data() + (m0 / kBlock) * chunks * (kChunk / 2) * kBlock;
        _tile_zero(0);
        _tile_zero(3);
        int64_t c = 0;
        for (; c + 1 < chunks; c += 2) {
          _tile_loadd(1, w.data() + c * kBlock * kChunk, 64);
          _tile_loadd(2, xb + c * (kChunk / 2) * kBlock, 64);
          _tile_loadd(4, w.data() + (c + 1) * kBlock * kChunk, 64);
          _tile_loadd(5, xb + (c + 1) * (kChunk / 2) * kBlock, 64);
          _tile_dpbf16ps(0, 1, 2);
          _tile_dpbf16ps(3, 4, 5);
        }
        if (c < chunks) {
          _tile_loadd(1, w.data() + c * kBlock * kChunk, 64);
          _tile_loadd(2, xb + c * (kChunk / 2) * kBlock, 64);
          _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, acc, 64);
        _tile_stored(3, odd, 64);
        for (int64_t j = 0; j < kBlock; ++j)
          for (int64_t r = 0; r < rows; ++r)
            op[(m0 + r) * n_out + n0 + j] =
                at::BFloat16((acc[j * kBlock + r] + odd[j * kBlock + r]) * post[n0 + j]);
      }
    }
    if (configured >= 0) _tile_release();
  });
  return out;
}

// PyTorch's int4 CPU layout (`_convert_weight_to_int4pack_for_cpu`): per block of
// 64 output channels, [K][32] bytes, byte (k, j) holding channel j's code in its low
// nibble and channel j + 32's in its high one; scales_zeros [K / 32, N, 2] bf16:
// w = (code - 8) * scale + zero. The codes are the B tile here (pairs of inputs
// interleaved per channel, which two rows of that layout give with one unpack), as
// the exact bf16 numbers 128 + code; x is the A tile, read in place. Per group of 32
// inputs, with D = x . (128 + code) and X = the sum of x over the group:
//   x . w = scale * D + (zero - 136 * scale) * X
// so every product is exact and only float32 sums round, as in PyTorch's kernel.

// The B tiles of one 16-channel block (`sub` picks which 16 of the 64-channel
// block): [chunk][16 input pairs][16 channels x 2] bf16, and each chunk's scales and
// offsets (zero - 136 * scale) for the 16 channels, float32.
inline void int4pack_block(const uint8_t* __restrict block, int sub, int64_t chunks,
                           int64_t n_out, const at::BFloat16* __restrict sz,
                           at::BFloat16* __restrict codes, float* __restrict scales,
                           float* __restrict offsets) {
  const int column = (sub % 2) * 16;
  const bool high = sub >= 2;
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m512i magic = _mm512_set1_epi16(0x4300);  // bf16 128.0: 0x4300 | q == 128 + q
  const __m512i evens = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30, 28,
                                         26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odds = _mm512_add_epi16(evens, _mm512_set1_epi16(1));
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* rows = block + c * kChunk * 32 + column;
    at::BFloat16* dst = codes + c * kBlock * kChunk;
    for (int p = 0; p < 16; ++p) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + (2 * p) * 32));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + (2 * p + 1) * 32));
      __m256i both = _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b));
      if (high) both = _mm256_srli_epi16(both, 4);
      both = _mm256_and_si256(both, _mm256_set_m128i(nibble, nibble));
      _mm512_storeu_si512(dst + p * 32, _mm512_or_si512(_mm512_cvtepu8_epi16(both), magic));
    }
    // (scale, zero) pairs of the 16 channels -> two float32 vectors.
    const __m512i pairs = _mm512_loadu_si512(sz + c * n_out * 2);
    const __m512 scale = widen(_mm512_castsi512_si256(_mm512_permutexvar_epi16(evens, pairs)));
    const __m512 zero = widen(_mm512_castsi512_si256(_mm512_permutexvar_epi16(odds, pairs)));
    _mm512_storeu_ps(scales + c * kBlock, scale);
    _mm512_storeu_ps(offsets + c * kBlock, _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), scale, zero));
  }
}

// Sum of each row of x over each chunk of 32 inputs: [M][chunks] float32.
std::vector<float> chunk_sums(const at::BFloat16* x, int64_t m_rows, int64_t k) {
  const int64_t chunks = k / kChunk;
  std::vector<float> out(m_rows * chunks);
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i v = _mm512_loadu_si512(x + m * k + c * kChunk);
      const __m512 lo = widen(_mm512_castsi512_si256(v));
      const __m512 hi = widen(_mm512_extracti64x4_epi64(v, 1));
      out[m * chunks + c] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    }
  }
  return out;
}

at::Tensor int4pack_linear(const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& scales_zeros) {
  tokenyard::check_int4_bf16(packed, scales_zeros);
  const int64_t n_out = packed.size(0), k = packed.size(1) * 2, chunks = k / kChunk;
  check(x, n_out, k);
  TORCH_CHECK(n_out % 64 == 0, "in_features must be a multiple of 32 and out_features of 64");
  const int64_t m_rows = x.size(0);
  at::Tensor out = at::empty({m_rows, n_out}, x.options());
  if (m_rows == 0) return out;
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const at::BFloat16* szp = scales_zeros.data_ptr<at::BFloat16>();
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const std::vector<float> xsum = chunk_sums(xp, m_rows, k);
  parallel_blocks(n_out / kBlock, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> codes(chunks * kBlock * kChunk);
    std::vector<float> scales(chunks * kBlock), offsets(chunks * kBlock);
    alignas(64) float part[2][kBlock * kBlock];
    alignas(64) float sum[kBlock * kBlock];
    int64_t configured = -1;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kBlock;
      int4pack_block(pp + (n0 / 64) * 64 * (k / 2), static_cast<int>((n0 % 64) / kBlock), chunks,
                     n_out, szp + n0 * 2, codes.data(), scales.data(), offsets.data());
      for (int64_t m0 = 0; m0 < m_rows; m0 += kBlock) {
        const int64_t rows = std::min(kBlock, m_rows - m0);
        if (rows != configured) {
          configure_xa(rows);
          configured = rows;
        }
        const at::BFloat16* xa = xp + m0 * k;
        for (int64_t r = 0; r < rows; ++r) _mm512_store_ps(sum + r * kBlock, _mm512_setzero_ps());
        // Two chunks at a time (tiles 0 and 3) so one product need not wait for the other.
        for (int64_t c = 0; c < chunks; c += 2) {
          const int64_t pair = std::min<int64_t>(2, chunks - c);
          _tile_zero(0);
          _tile_loadd(1, xa + c * kChunk, 2 * k);
          _tile_loadd(2, codes.data() + c * kBlock * kChunk, 64);
          _tile_dpbf16ps(0, 1, 2);
          if (pair == 2) {
            _tile_zero(3);
            _tile_loadd(4, xa + (c + 1) * kChunk, 2 * k);
            _tile_loadd(5, codes.data() + (c + 1) * kBlock * kChunk, 64);
            _tile_dpbf16ps(3, 4, 5);
          }
          _tile_stored(0, part[0], 64);
          if (pair == 2) _tile_stored(3, part[1], 64);
          for (int64_t i = 0; i < pair; ++i) {
            const __m512 scale = _mm512_loadu_ps(scales.data() + (c + i) * kBlock);
            const __m512 offset = _mm512_loadu_ps(offsets.data() + (c + i) * kBlock);
            for (int64_t r = 0; r < rows; ++r) {
              __m512 acc = _mm512_load_ps(sum + r * kBlock);
              acc = _mm512_fmadd_ps(scale, _mm512_load_ps(part[i] + r * kBlock), acc);
              acc = _mm512_fmadd_ps(offset, _mm512_set1_ps(xsum[(m0 + r) * chunks + c + i]), acc);
              _mm512_store_ps(sum + r * kBlock, acc);
            }
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + (m0 + r) * n_out + n0),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sum + r * kBlock)));
        }
      }
    }
    if (configured >= 0) _tile_release();
  });
  return out;
}

bool available() {
  static const bool ok = request_amx();
  return ok;
}

}  // namespace

TORCH_LIBRARY(tokenyard, m) {
  m.def("amx_available() -> bool");
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("int4pack_linear(Tensor x, Tensor packed, Tensor scales_zeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenyard, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4pack_linear", &int4pack_linear);
}

TORCH_LIBRARY_IMPL(tokenyard, CatchAll, m) {
  m.impl("amx_available", []() { return available(); });
}
