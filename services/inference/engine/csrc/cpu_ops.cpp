// The decode step's small per-layer ops as one call each, for any x86-64 CPU.
//
// At one stream a decode step of the demo model is ~1,700 PyTorch op calls; each
// RMSNorm alone is eight (widen, square, mean, add, rsqrt, multiply, narrow, scale)
// and cost ~50 us on 576 numbers. Here it is one loop over each row, with the same
// arithmetic as transformers' LlamaRMSNorm: in float32, the normalised row rounded
// to the model's dtype before the weight multiplies it.
//
// Rotary positions likewise: one call for the query and key heads of a layer
// instead of five (two multiplies, a roll as two slices and a cat, an add).
//
// Compiled without ISA flags, so it runs wherever PyTorch does; each row function is
// cloned for AVX-512 and AVX2 and the CPU picks one at load (TOKENYARD_CLONES). From
// `kParallelRows` rows the rows are split across the calling thread's OpenMP team (64
// rows of the demo model, bf16, 2-core Zen 5: an add and RMSNorm took 102 us on one
// core). float32 and bfloat16 only.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "parallel_blocks.h"

namespace {

constexpr int64_t kParallelRows = 8;

// f(begin, end) over the rows [0, rows): on this thread below kParallelRows, else
// split across the team.
template <typename F>
void over_rows(int64_t rows, const F& f) {
  if (rows < kParallelRows) {
    f(0, rows);
  } else {
    tokenyard::parallel_blocks(rows, f);
  }
}

constexpr int64_t kLanes = 16;

template <typename T>
__attribute__((always_inline)) inline void norm_rows_impl(const T* x, const T* w, T* out,
                                                          int64_t rows, int64_t h, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * h;
    // kLanes partial sums: one chain of adds over the row took ~0.7 us a row of 576
    // (each add waits for the last); split, the compiler vectorises them.
    float part[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= h; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) {
        const float v = static_cast<float>(xr[i + j]);
        part[j] += v * v;
      }
    for (; i < h; ++i) {
      const float v = static_cast<float>(xr[i]);
      part[0] += v * v;
    }
    float sq = 0.f;
    for (const float p : part) sq += p;
    const float inv = 1.f / std::sqrt(sq / static_cast<float>(h) + static_cast<float>(eps));
    T* o = out + r * h;
    for (int64_t i = 0; i < h; ++i) {
      const T normed = static_cast<T>(static_cast<float>(xr[i]) * inv);  // in x's dtype
      o[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
    }
  }
}

template <typename T>
__attribute__((always_inline)) inline void add_rows_impl(T* x, const T* delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    x[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(delta[i]));
}

// o[i] = x[i] * c[i] + turned[i] * s[i] for i < n, each product and the sum rounded to T.
template <typename T>
__attribute__((always_inline)) inline void rotate(const T* x, const T* turned, const T* c,
                                                  const T* s, T* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T a = static_cast<T>(static_cast<float>(x[i]) * static_cast<float>(c[i]));
    const T b = static_cast<T>(static_cast<float>(turned[i]) * static_cast<float>(s[i]));
    o[i] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
  }
}

template <typename T>
__attribute__((always_inline)) inline void rope_rows_impl(const T* x, int64_t row_stride,
                                                          const T* cos, const T* sin, T* out,
                                                          int64_t rows, int64_t heads, int64_t hd,
                                                          int64_t rd) {
  const int64_t half = rd / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * rd;
    const T* s = sin + r * rd;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xh = x + r * row_stride + h * hd;
      T* o = out + (r * heads + h) * hd;
      // roll(x, rd / 2): the first half turns the second half, and the other way round
      // (two loops rather than a conditional index, so that they vectorise).
      rotate(xh, xh + half, c, s, o, half);
      rotate(xh + half, xh, c + half, s + half, o + half, half);
      for (int64_t i = rd; i < hd; ++i) o[i] = xh[i];
    }
  }
}

// Each row function compiled for AVX-512 and AVX2 besides baseline x86-64, picked
// at load by the CPU (GCC's target_clones). With -ffp-contract=off (cpu_kernels.py)
// every clone rounds alike, so results do not depend on the CPU; the same
// arithmetic, vectorised: at 64 rows of the demo model on a 2-core Zen 5 an add and
// RMSNorm took 28 us and rotary plus cache writes 38 us in baseline x86-64, 9 and
// 10 us cloned.
#define TOKENYARD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// 16 floats as GCC's vector extension: compiled for whatever each clone has (the
// first-max loops did not vectorise as plain loops).
typedef float F32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));

inline F32x16 load16(const float* p) {
  F32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline F32x16 load16(const at::BFloat16* p) {  // bf16 is float's high half
  U16x16 h;
  std::memcpy(&h, p, sizeof h);
  const U32x16 w = __builtin_convertvector(h, U32x16) << 16;
  F32x16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline bool any(I32x16 m) {
  uint64_t w[8];
  std::memcpy(w, &m, sizeof w);
  return (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0;
}

// Row r's index of its first largest value (of its first NaN if it has one, as
// torch.max): the row's maximum 16 lanes at a time, then the first 16 holding it
// (the row is in cache for the second pass).
template <typename T>
__attribute__((always_inline)) inline void first_max_impl(const T* x, int64_t rows, int64_t n,
                                                          int64_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    F32x16 best = F32x16{} - INFINITY;
    I32x16 nan = {};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const F32x16 v = load16(xr + i);
      best = best < v ? v : best;
      nan |= v != v;
    }
    float top = -INFINITY;
    bool any_nan = any(nan);
    for (int64_t j = 0; j < 16; ++j) top = top < best[j] ? best[j] : top;
    for (; i < n; ++i) {
      const float v = static_cast<float>(xr[i]);
      top = top < v ? v : top;
      any_nan |= v != v;
    }
    int64_t k = 0;
    if (any_nan) {
      while (static_cast<float>(xr[k]) == static_cast<float>(xr[k])) ++k;
    } else {
      while (k + 16 <= n && !any(load16(xr + k) == top)) k += 16;
      while (static_cast<float>(xr[k]) != top) ++k;
    }
    out[r] = k;
  }
}

#define TOKENYARD_ROW_FUNCTIONS(T, SUFFIX)                                                    \
  TOKENYARD_CLONES void norm_rows_##SUFFIX(const T* x, const T* w, T* out, int64_t rows,      \
                                           int64_t h, double eps) {                          \
    norm_rows_impl(x, w, out, rows, h, eps);                                                 \
  }                                                                                          \
  TOKENYARD_CLONES void add_rows_##SUFFIX(T* x, const T* delta, int64_t n) {                  \
    add_rows_impl(x, delta, n);                                                              \
  }                                                                                          \
  TOKENYARD_CLONES void rope_rows_##SUFFIX(const T* x, int64_t row_stride, const T* cos,      \
                                           const T* sin, T* out, int64_t rows, int64_t heads, \
                                           int64_t hd, int64_t rd) {                         \
    rope_rows_impl(x, row_stride, cos, sin, out, rows, heads, hd, rd);                       \
  }                                                                                          \
  TOKENYARD_CLONES void first_max_##SUFFIX(const T* x, int64_t rows, int64_t n, int64_t* out) {\
    first_max_impl(x, rows, n, out);                                                         \
  }
TOKENYARD_ROW_FUNCTIONS(float, f32)
TOKENYARD_ROW_FUNCTIONS(at::BFloat16, bf16)
#undef TOKENYARD_ROW_FUNCTIONS

// The clone for T: float or at::BFloat16 (`TOKENYARD_DISPATCH` admits no other).
template <typename T>
void norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t h, double eps) {
  if constexpr (std::is_same_v<T, float>) norm_rows_f32(x, w, out, rows, h, eps);
  else norm_rows_bf16(x, w, out, rows, h, eps);
}

template <typename T>
void add_rows(T* x, const T* delta, int64_t n) {
  if constexpr (std::is_same_v<T, float>) add_rows_f32(x, delta, n);
  else add_rows_bf16(x, delta, n);
}

template <typename T>
void rope_rows(const T* x, int64_t row_stride, const T* cos, const T* sin, T* out, int64_t rows,
               int64_t heads, int64_t hd, int64_t rd) {
  if constexpr (std::is_same_v<T, float>)
    rope_rows_f32(x, row_stride, cos, sin, out, rows, heads, hd, rd);
  else
    rope_rows_bf16(x, row_stride, cos, sin, out, rows, heads, hd, rd);
}

template <typename T>
void first_max_rows(const T* x, int64_t rows, int64_t n, int64_t* out) {
  if constexpr (std::is_same_v<T, float>) first_max_f32(x, rows, n, out);
  else first_max_bf16(x, rows, n, out);
}

// AT_DISPATCH over the two dtypes the ops take (each checks it first).
#define TOKENYARD_DISPATCH(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void check(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() &&
                  weight.numel() == x.size(1),
              "weight must be contiguous, x's dtype, one per column of x");
}

// weight * rms_norm(x), as transformers' LlamaRMSNorm computes it.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x, weight);
  at::Tensor out = at::empty_like(x);
  const int64_t h = x.size(1);
  TOKENYARD_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    over_rows(x.size(0), [&](int64_t begin, int64_t end) {
      norm_rows(x.data_ptr<scalar_t>() + begin * h, weight.data_ptr<scalar_t>(),
                out.data_ptr<scalar_t>() + begin * h, end - begin, h, eps);
    });
  });
  return out;
}

// x += delta (rounded to x's dtype, as ``x + delta``), then weight * rms_norm(x).
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                         double eps) {
  check(x, weight);
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type() &&
                  delta.is_contiguous(),
              "delta must be a contiguous tensor of x's shape and dtype");
  at::Tensor out = at::empty_like(x);
  const int64_t h = x.size(1);
  TOKENYARD_DISPATCH(x.scalar_type(), "add_rms_norm_", [&] {
    over_rows(x.size(0), [&](int64_t begin, int64_t end) {
      scalar_t* xr = x.data_ptr<scalar_t>() + begin * h;
      add_rows(xr, delta.data_ptr<scalar_t>() + begin * h, (end - begin) * h);
      norm_rows(xr, weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + begin * h,
                end - begin, h, eps);
    });
  });
  return out;
}


// Rotary positions on every head of `qk` ([rows, heads, head_dim], rows and heads
// strided as a slice of the fused QKV output may be): ``x * cos + roll(x, rd / 2) *
// sin`` on the first rd = cos.size(1) dims with `sin` already signed, the rest copied;
// each product and the sum rounded to x's dtype as PyTorch's ops round them.
at::Tensor rope(const at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1 && qk.stride(1) == qk.size(2),
              "qk must be [rows, heads, head_dim] with whole heads side by side");
  TORCH_CHECK(qk.scalar_type() == at::kFloat || qk.scalar_type() == at::kBFloat16,
              "qk must be float32 or bfloat16");
  const int64_t rows = qk.size(0), rd = cos.size(-1);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.numel() == rows * rd && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.scalar_type() == qk.scalar_type() &&
                  sin.scalar_type() == qk.scalar_type(),
              "cos and sin must be contiguous, qk's dtype, one row of rotary dims per row");
  TORCH_CHECK(rd % 2 == 0 && rd <= qk.size(2), "rotary dims must be even and at most head_dim");
  at::Tensor out = at::empty({rows, qk.size(1), qk.size(2)}, qk.options());
  const int64_t heads = qk.size(1), hd = qk.size(2);
  TOKENYARD_DISPATCH(qk.scalar_type(), "rope", [&] {
    over_rows(rows, [&](int64_t begin, int64_t end) {
      rope_rows(qk.data_ptr<scalar_t>() + begin * qk.stride(0), qk.stride(0),
                cos.data_ptr<scalar_t>() + begin * rd, sin.data_ptr<scalar_t>() + begin * rd,
                out.data_ptr<scalar_t>() + begin * heads * hd, end - begin, heads, hd, rd);
    });
  });
  return out;
}

// A decode step's keys and values into the cache, with rotary positions: `qkv` is
// the fused projection's output [rows, (q_heads + 2 kv_heads) * head_dim]; the
// query heads come back rotated ([rows, q_heads, head_dim]), and each row's kv
// heads are rotated (keys) or copied (values) into rows `rows[r * kv_heads + h]` of
// one layer's cache ([slots, kv_heads, capacity, head_dim], seen as rows of
// head_dim). One call for what took a rotary, two slices, two reshapes and two
// index_copy_ calls from Python (ten op calls a layer, the profile of a one-row step said).
at::Tensor rope_write_(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                       at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& rows,
                       int64_t q_heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv must be a contiguous 2-D tensor");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16,
              "qkv must be float32 or bfloat16");
  TORCH_CHECK(q_heads > 0 && kv_heads > 0, "q_heads and kv_heads must be positive");
  const int64_t n = qkv.size(0), heads = q_heads + 2 * kv_heads;
  TORCH_CHECK(qkv.size(1) % heads == 0, "qkv's width must be whole heads");
  const int64_t hd = qkv.size(1) / heads, rd = cos.size(-1);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.numel() == n * rd && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.scalar_type() == qkv.scalar_type() &&
                  sin.scalar_type() == qkv.scalar_type(),
              "cos and sin must be contiguous, qkv's dtype, one row of rotary dims per row");
  TORCH_CHECK(rd % 2 == 0 && rd <= hd, "rotary dims must be even and at most head_dim");
  for (const at::Tensor* cache : {&k_cache, &v_cache})
    TORCH_CHECK(cache->dim() == 4 && cache->is_contiguous() &&
                    cache->scalar_type() == qkv.scalar_type() && cache->size(1) == kv_heads &&
                    cache->size(3) == hd,
                "the caches must be contiguous [slots, kv_heads, capacity, head_dim] in qkv's dtype");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous() &&
                  rows.numel() == n * kv_heads,
              "rows must be int64, one cache row per row of qkv and kv head");
  const int64_t cache_rows = k_cache.numel() / hd;
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < cache_rows, "rows[", i, "] = ", rp[i], " is outside 0..",
                cache_rows - 1);
  at::Tensor q = at::empty({n, q_heads, hd}, qkv.options());
  TOKENYARD_DISPATCH(qkv.scalar_type(), "rope_write_", [&] {
    const scalar_t* x = qkv.data_ptr<scalar_t>();
    const scalar_t* c = cos.data_ptr<scalar_t>();
    const scalar_t* s = sin.data_ptr<scalar_t>();
    scalar_t* k = k_cache.data_ptr<scalar_t>();
    scalar_t* v = v_cache.data_ptr<scalar_t>();
    scalar_t* qp = q.data_ptr<scalar_t>();
    const int64_t stride = heads * hd;
    over_rows(n, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = x + r * stride;
        rope_rows(xr, stride, c + r * rd, s + r * rd, qp + r * q_heads * hd, 1, q_heads, hd, rd);
        for (int64_t h = 0; h < kv_heads; ++h) {
          const int64_t at = rp[r * kv_heads + h] * hd;
          rope_rows(xr + (q_heads + h) * hd, stride, c + r * rd, s + r * rd, k + at, 1, 1, hd, rd);
          std::copy(xr + (q_heads + kv_heads + h) * hd, xr + (q_heads + kv_heads + h + 1) * hd,
                    v + at);
        }
      }
    });
  });
  return q;
}

// Each row's index of its first largest value, as ``x.max(dim=-1).indices``: the
// greedy choice. PyTorch's reduction took ~1 ms for 64 rows of the demo model's
// 49152 bf16 logits on a 2-core Zen 5, about 2 % of a 64-row step.
at::Tensor first_max(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0,
              "x must be a contiguous 2-D tensor with at least one column");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  TOKENYARD_DISPATCH(x.scalar_type(), "first_max", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    over_rows(rows, [&](int64_t b, int64_t e) { first_max_rows(xp + b * n, e - b, n, op + b); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tokenyard_ops, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor qk, Tensor cos, Tensor sin) -> Tensor");
  m.def(
      "rope_write_(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor rows, int q_heads, int kv_heads) -> Tensor");
  m.def("first_max(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenyard_ops, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("rope", &rope);
  m.impl("rope_write_", &rope_write_);
  m.impl("first_max", &first_max);
}
