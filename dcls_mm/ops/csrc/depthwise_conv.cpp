// Forward depthwise 2-D convolution (stride 1, zero padding) on the CPU, channels_last.
//
//   y[n, c, oy, ox] = b[c] + sum_{i, j} k[c, i, j] * x[n, c, oy + i - pad_top, ox + j - pad_left]
//
// An exact alternative to oneDNN's depthwise kernel for large kernels (17x17, 23x23):
// every output visits only the taps that meet the input (no padded buffer), the innermost
// dimension is a block of 16 contiguous channels, and a tile of output columns keeps its
// sums in registers over all taps (8 columns with AVX-512, 6 with AVX2). Against oneDNN
// with the same ISA (batch 8, ConvNeXt shapes, 17x17 and 23x23, one run each): AVX2
// 0.46-0.91x its time, AVX-512 0.6-2.2x; so it is one candidate of the measured route `conv`
// (dcls_mm.ops.depthwise), never a default.
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

using dcls_mm_isa::Block16;
using dcls_mm_isa::fma16;
using dcls_mm_isa::load16;
using dcls_mm_isa::store16;

constexpr int64_t kBlock = 16;

struct Geometry {
  int64_t N, C, H, W, Ho, Wo, kh, kw, pad_top, pad_left;
};

// Output columns [ox0, ox0 + TO) of row oy, channels [c0, c0 + 16) of image n, their sums
// in registers over all taps. k is (kh * kw, C), bias (C,) or null.
template <int level, int TO>
DCLS_MM_INLINE void conv_tile(const float* __restrict x, const float* __restrict k,
                              const float* __restrict bias, float* __restrict out,
                              const Geometry& s, int64_t n, int64_t c0, int64_t oy,
                              int64_t ox0) {
  using V = typename Block16<level>::V;
  constexpr int P = Block16<level>::P;
  const int64_t C = s.C;
  V acc[TO][P];
  V b[P] = {};
  if (bias) load16<level>(b, bias + c0);
#pragma GCC unroll 8
  for (int t = 0; t < TO; ++t)
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) acc[t][p] = b[p];
  // kernel rows whose input row lies inside the map
  const int64_t i_lo = std::max<int64_t>(0, s.pad_top - oy);
  const int64_t i_hi = std::min(s.kh, s.H + s.pad_top - oy);
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const float* xrow = x + ((n * s.H + oy + i - s.pad_top) * s.W) * C + c0;
    const float* krow = k + (i * s.kw) * C + c0;
    for (int64_t j = 0; j < s.kw; ++j) {
      const int64_t first = ox0 + j - s.pad_left;  // input column of output ox0
      if constexpr (level == dcls_mm_isa::kV4 && TO == dcls_mm_isa::kSumRegisters<level>) {
        // taps j and j + 1 together where both meet the input at every column of the
        // tile: input column u serves tap j at output u and tap j + 1 at output u - 1,
        // so TO + 1 loads (kept in registers) feed 2 TO multiply-adds (one tap at a time:
        // TO + 1 loads for TO, the loads bound the loop). The taps stay in order (same
        // bits). AVX-512 only (the AVX2 tiles, two ymm per sum, leave no registers), full
        // tiles only (on 7x7 maps the narrower tiles ran ~15% slower with it).
        if (j + 1 < s.kw && first >= 0 && first + TO + 1 <= s.W) {
          V k0[P], k1[P];
          load16<level>(k0, krow + j * C);
          load16<level>(k1, krow + (j + 1) * C);
          const float* xp = xrow + first * C;
#pragma GCC unroll 9
          for (int u = 0; u <= TO; ++u) {
            V xv[P];
            load16<level>(xv, xp + u * C);
#pragma GCC unroll 4
            for (int q = 0; q < P; ++q) {
              DCLS_MM_IN_REGISTER(xv[q]);
              if (u < TO) acc[u][q] += k0[q] * xv[q];
              if (u > 0) acc[u - 1][q] += k1[q] * xv[q];
            }
          }
          ++j;
          continue;
        }
      }
      V kv[P];
      load16<level>(kv, krow + j * C);
      if (first >= 0 && first + TO <= s.W) {
        const float* xp = xrow + first * C;
#pragma GCC unroll 8
        for (int t = 0; t < TO; ++t) fma16<level>(acc[t], kv, xp + t * C);
      } else {  // near the left or right edge: only the columns inside the map
#pragma GCC unroll 8
        for (int t = 0; t < TO; ++t) {
          const int64_t col = first + t;
          if (col >= 0 && col < s.W) fma16<level>(acc[t], kv, xrow + col * C);
        }
      }
    }
  }
  float* orow = out + ((n * s.Ho + oy) * s.Wo + ox0) * C + c0;
#pragma GCC unroll 8
  for (int t = 0; t < TO; ++t) store16<level>(orow + t * C, acc[t]);
}

// Output row oy of channels [c0, c0 + 16) of image n: tiles of as many columns as the
// level keeps sums in registers, the last Wo % TO columns in tiles of 4, 2, 1.
template <int level>
DCLS_MM_INLINE void conv_row_impl(const float* __restrict x, const float* __restrict k,
                                  const float* __restrict bias, float* __restrict out,
                                  const Geometry& s, int64_t n, int64_t c0, int64_t oy) {
  constexpr int TO = dcls_mm_isa::kSumRegisters<level>;
  int64_t ox = 0;
  for (; ox + TO <= s.Wo; ox += TO) conv_tile<level, TO>(x, k, bias, out, s, n, c0, oy, ox);
  if constexpr (TO > 4) {
    if (s.Wo - ox >= 4) { conv_tile<level, 4>(x, k, bias, out, s, n, c0, oy, ox); ox += 4; }
  }
  if constexpr (TO > 2) {
    if (s.Wo - ox >= 2) { conv_tile<level, 2>(x, k, bias, out, s, n, c0, oy, ox); ox += 2; }
  }
  if (ox < s.Wo) conv_tile<level, 1>(x, k, bias, out, s, n, c0, oy, ox);
}
DCLS_MM_ISA_LEVEL_VARIANTS(conv_row,
                           (const float* __restrict x, const float* __restrict k,
                            const float* __restrict bias, float* __restrict out,
                            const Geometry& s, int64_t n, int64_t c0, int64_t oy),
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
