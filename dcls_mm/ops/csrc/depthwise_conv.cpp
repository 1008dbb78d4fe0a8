// Forward depthwise 2-D convolution (stride 1, zero padding) on the CPU, channels_last.
//
//   y[n, c, oy, ox] = b[c] + sum_{i, j} k[c, i, j] * x[n, c, oy + i - pad_top, ox + j - pad_left]
//
// An exact alternative to oneDNN's depthwise kernel for large kernels (17x17, 23x23):
// every output visits only the taps that meet the input (no padded buffer), the innermost
// loop is a block of 16 contiguous channels (one AVX-512 / two AVX2 vectors), and four
// output columns share each kernel load. Measured against oneDNN with the same AVX2 ISA
// it was 10-25% faster on ConvNeXt shapes, with AVX-512 it was slower; so it is one
// candidate of the measured route `conv` (dcls_mm.ops.depthwise), never a default.
//
// Work items are (image, block of 16 channels, output row). Channel counts that are not
// a multiple of 16 are not offered to this op (the caller checks).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "isa.h"

namespace {

constexpr int64_t kBlock = 16;

struct Geometry {
  int64_t N, C, H, W, Ho, Wo, kh, kw, pad_top, pad_left;
};

// Output row oy of channels [c0, c0 + 16) of image n. k is (kh * kw, C), bias (C,) or null.
DCLS_MM_INLINE void conv_row_impl(const float* __restrict x, const float* __restrict k,
                                  const float* __restrict bias, float* __restrict out,
                                  const Geometry& s, int64_t n, int64_t c0, int64_t oy) {
  constexpr int64_t B = kBlock;
  const int64_t C = s.C;
  // kernel rows whose input row lies inside the map
  const int64_t i_lo = std::max<int64_t>(0, s.pad_top - oy);
  const int64_t i_hi = std::min(s.kh, s.H + s.pad_top - oy);
  float b[B];
  for (int64_t c = 0; c < B; ++c) b[c] = bias ? bias[c0 + c] : 0.0f;
  float* orow = out + ((n * s.Ho + oy) * s.Wo) * C + c0;
  int64_t ox = 0;
  for (; ox + 4 <= s.Wo; ox += 4) {
    float acc[4][B];
    for (int t = 0; t < 4; ++t) std::copy_n(b, B, acc[t]);
    const int64_t base = ox - s.pad_left;
    // taps valid for all four columns: [all_lo, all_hi); the others column by column
    const int64_t all_lo = std::max<int64_t>(0, -base);
    const int64_t all_hi = std::max(all_lo, std::min(s.kw, s.W - base - 3));
    for (int64_t i = i_lo; i < i_hi; ++i) {
      const float* xrow = x + ((n * s.H + oy + i - s.pad_top) * s.W) * C + c0;
      const float* krow = k + (i * s.kw) * C + c0;
      for (int64_t j = all_lo; j < all_hi; ++j) {
        const float* kv = krow + j * C;
        const float* xp = xrow + (base + j) * C;
#pragma GCC ivdep
        for (int64_t c = 0; c < B; ++c) {
          acc[0][c] += kv[c] * xp[c];
          acc[1][c] += kv[c] * xp[C + c];
          acc[2][c] += kv[c] * xp[2 * C + c];
          acc[3][c] += kv[c] * xp[3 * C + c];
        }
      }
      for (int t = 0; t < 4; ++t) {
        const int64_t col = base + t;
        const int64_t j_lo = std::max<int64_t>(0, -col), j_hi = std::min(s.kw, s.W - col);
        for (int64_t j = j_lo; j < std::min(all_lo, j_hi); ++j) {
          const float* kv = krow + j * C;
          const float* xp = xrow + (col + j) * C;
#pragma GCC ivdep
          for (int64_t c = 0; c < B; ++c) acc[t][c] += kv[c] * xp[c];
        }
        for (int64_t j = std::max(all_hi, j_lo); j < j_hi; ++j) {
          const float* kv = krow + j * C;
          const float* xp = xrow + (col + j) * C;
#pragma GCC ivdep
          for (int64_t c = 0; c < B; ++c) acc[t][c] += kv[c] * xp[c];
        }
      }
    }
    for (int t = 0; t < 4; ++t) std::copy_n(acc[t], B, orow + (ox + t) * C);
  }
  // the last columns one by one; written out rather than one template over the column
  // count: that version ran 1.0-1.5x oneDNN's time on the AVX2 copy against 0.6-1.0x here
  for (; ox < s.Wo; ++ox) {
    float acc[B];
    std::copy_n(b, B, acc);
    const int64_t col = ox - s.pad_left;
    const int64_t j_lo = std::max<int64_t>(0, -col), j_hi = std::min(s.kw, s.W - col);
    for (int64_t i = i_lo; i < i_hi; ++i) {
      const float* xrow = x + ((n * s.H + oy + i - s.pad_top) * s.W) * C + c0;
      const float* krow = k + (i * s.kw) * C + c0;
      for (int64_t j = j_lo; j < j_hi; ++j) {
        const float* kv = krow + j * C;
        const float* xp = xrow + (col + j) * C;
#pragma GCC ivdep
        for (int64_t c = 0; c < B; ++c) acc[c] += kv[c] * xp[c];
      }
    }
    std::copy_n(acc, B, orow + ox * C);
  }
}
DCLS_MM_ISA_VARIANTS(conv_row,
                     (const float* __restrict x, const float* __restrict k,
                      const float* __restrict bias, float* __restrict out, const Geometry& s,
                      int64_t n, int64_t c0, int64_t oy),
                     (x, k, bias, out, s, n, c0, oy))

at::Tensor depthwise_conv(const at::Tensor& x, const at::Tensor& kernel,
                          const c10::optional<at::Tensor>& bias, int64_t pad_top,
                          int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  const char* name = "dcls_mm::depthwise_conv";
  TORCH_CHECK(x.device().is_cpu() && kernel.device().is_cpu(), name,
              ": tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && kernel.scalar_type() == at::kFloat, name,
              ": float32 tensors expected");
  TORCH_CHECK(x.dim() == 4 && kernel.dim() == 4 && kernel.size(0) == x.size(1) &&
                  kernel.size(1) == 1,
              name, ": x must be (N, C, H, W) and kernel (C, 1, kh, kw), got ", x.sizes(),
              ", ", kernel.sizes());
  TORCH_CHECK(x.size(1) % kBlock == 0, name, ": the channel count must be a multiple of ",
              kBlock, ", got ", x.size(1));
  TORCH_CHECK(pad_top >= 0 && pad_bottom >= 0 && pad_left >= 0 && pad_right >= 0, name,
              ": padding must not be negative");
  const Geometry s{x.size(0), x.size(1), x.size(2), x.size(3),
                   x.size(2) + pad_top + pad_bottom - kernel.size(2) + 1,
                   x.size(3) + pad_left + pad_right - kernel.size(3) + 1,
                   kernel.size(2), kernel.size(3), pad_top, pad_left};
  TORCH_CHECK(s.Ho > 0 && s.Wo > 0, name, ": the padded input is smaller than the kernel");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == s.C, name,
                ": bias must be float32 (C,), got ", b.sizes());
  }
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor k = kernel.reshape({s.C, s.kh * s.kw}).t().contiguous();  // (taps, C)
  at::Tensor out = at::empty({s.N, s.C, s.Ho, s.Wo},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* xp = xc.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  const int64_t blocks = s.C / kBlock;
  at::parallel_for(0, s.N * blocks * s.Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t oy = item % s.Ho, blk = (item / s.Ho) % blocks, n = item / (s.Ho * blocks);
      conv_row(xp, kp, bp, op, s, n, blk * kBlock, oy);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcls_mm, m) {
  m.def("depthwise_conv(Tensor x, Tensor kernel, Tensor? bias, int pad_top, int pad_bottom, "
        "int pad_left, int pad_right) -> Tensor");
}

TORCH_LIBRARY_IMPL(dcls_mm, CPU, m) { m.impl("depthwise_conv", &depthwise_conv); }
