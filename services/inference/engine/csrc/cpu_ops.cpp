// The decode step's small per-layer ops as one call each, for any x86-64 CPU.
//
// At one stream a decode step of the demo model is ~1,700 PyTorch op calls; each
// RMSNorm alone is eight (widen, square, mean, add, rsqrt, multiply, narrow, scale)
// and cost ~50 us on 576 numbers. Here it is one loop over each row, with the same
// arithmetic as transformers' LlamaRMSNorm: in float32, the normalised row rounded
// to the model's dtype before the weight multiplies it.
//
// Compiled without ISA flags (baseline x86-64, auto-vectorised): it runs wherever
// PyTorch does.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

template <typename T>
void norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t h, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * h;
    float sq = 0.f;
    for (int64_t i = 0; i < h; ++i) {
      const float v = static_cast<float>(xr[i]);
      sq += v * v;
    }
    const float inv = 1.f / std::sqrt(sq / static_cast<float>(h) + static_cast<float>(eps));
    T* o = out + r * h;
    for (int64_t i = 0; i < h; ++i) {
      const T normed = static_cast<T>(static_cast<float>(xr[i]) * inv);  // in x's dtype
      o[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
    }
  }
}

template <typename T>
void add_rows(T* x, const T* delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    x[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(delta[i]));
}

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
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    norm_rows(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
              x.size(0), x.size(1), eps);
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
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm_", [&] {
    add_rows(x.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), x.numel());
    norm_rows(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
              x.size(0), x.size(1), eps);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tokenyard_ops, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenyard_ops, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
}
