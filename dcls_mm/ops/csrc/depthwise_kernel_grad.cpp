// Kernel gradient of a depthwise 2-D convolution on the CPU, channels_last.
//
//   grad_k[c, 0, i, j] = sum_{n, y, x} g[n, c, y, x] * x_pad[n, c, s_h*y + i, s_w*x + j]
//
// PyTorch's own weight gradient for a large depthwise kernel costs tens of times the
// forward, and the FFT formulation used by the pure-PyTorch fallback has a fixed cost
// that dominates on ConvNeXt's small (14x14, 7x7) maps. Here every tap only visits the
// (y, x) where it meets the input (no padded buffer: on a 7x7 map a 13x13 kernel would
// otherwise do 3.4x the useful work), and the channels_last layout makes the innermost
// loop a contiguous block of channels, which the compiler vectorises.
//
// Work items are (block of kChannelBlock channels, kernel row); each item accumulates
// one kernel row for its channels in a small buffer that stays in L1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "isa.h"

namespace {

constexpr int64_t kChannelBlock = 16;

struct Geometry {
  int64_t N, C, H, W, Ho, Wo, kh, kw, pad_top, pad_left, stride_h, stride_w;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Accumulates kernel row `ky` for channels [c0, c0 + cb), cb <= kChannelBlock, into acc
// (kw x kChannelBlock). Full blocks (all but maybe the last) take the unrolled,
// fixed-width loops, which the compiler vectorises.
DCLS_MM_INLINE void accumulate_row_impl(const float* __restrict x, const float* __restrict g,
                    float* __restrict acc, const Geometry& s, int64_t c0, int64_t cb,
                    int64_t ky) {
  constexpr int64_t B = kChannelBlock;
  std::fill(acc, acc + s.kw * B, 0.f);
  if (s.H - 1 + s.pad_top - ky < 0) return;  // the row never meets the input
  // output rows whose input row s_h*y + ky - pad_top lies inside the map
  const int64_t y_lo = ceil_div(std::max<int64_t>(0, s.pad_top - ky), s.stride_h);
  const int64_t y_hi = std::min(s.Ho, (s.H - 1 + s.pad_top - ky) / s.stride_h + 1);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t y = y_lo; y < y_hi; ++y) {
      const float* grow = g + ((n * s.Ho + y) * s.Wo) * s.C + c0;
      const float* xrow = x + ((n * s.H + y * s.stride_h + ky - s.pad_top) * s.W) * s.C + c0;
      int64_t ox = 0;
      if (cb == B) {
        // four output columns at a time: one load/store of acc per four multiply-adds
        for (; ox + 4 <= s.Wo; ox += 4) {
          float gv[4][B];
          for (int t = 0; t < 4; ++t)
            for (int64_t c = 0; c < B; ++c) gv[t][c] = grow[(ox + t) * s.C + c];
          const int64_t base = ox * s.stride_w - s.pad_left, step = s.stride_w * s.C;
          // taps valid for all four columns: [all_lo, all_hi)
          const int64_t all_lo = std::max<int64_t>(0, -base);
          const int64_t all_hi =
              std::max(all_lo, std::min(s.kw, s.W - base - 3 * s.stride_w));
          for (int64_t j = all_lo; j < all_hi; ++j) {
            const float* xp = xrow + (base + j) * s.C;
            float* a = acc + j * B;
#pragma GCC ivdep
            for (int64_t c = 0; c < B; ++c)
              a[c] += gv[0][c] * xp[c] + gv[1][c] * xp[step + c] +
                      gv[2][c] * xp[2 * step + c] + gv[3][c] * xp[3 * step + c];
          }
          // the taps only some of the columns meet, column by column
          for (int t = 0; t < 4; ++t) {
            const int64_t col = base + t * s.stride_w;
            const int64_t j_lo = std::max<int64_t>(0, -col);
            const int64_t j_hi = std::min(s.kw, s.W - col);
            for (int64_t j = j_lo; j < std::min(all_lo, j_hi); ++j) {
              const float* xp = xrow + (col + j) * s.C;
              float* a = acc + j * B;
#pragma GCC ivdep
              for (int64_t c = 0; c < B; ++c) a[c] += gv[t][c] * xp[c];
            }
            for (int64_t j = std::max(all_hi, j_lo); j < j_hi; ++j) {
              const float* xp = xrow + (col + j) * s.C;
              float* a = acc + j * B;
#pragma GCC ivdep
              for (int64_t c = 0; c < B; ++c) a[c] += gv[t][c] * xp[c];
            }
          }
        }
      }
      for (; ox < s.Wo; ++ox) {
        const int64_t base = ox * s.stride_w - s.pad_left;
        const int64_t j_lo = std::max<int64_t>(0, -base);
        const int64_t j_hi = std::min(s.kw, s.W - base);
        const float* gp = grow + ox * s.C;
        for (int64_t j = j_lo; j < j_hi; ++j) {
          const float* xp = xrow + (base + j) * s.C;
          float* a = acc + j * B;
          for (int64_t c = 0; c < cb; ++c) a[c] += gp[c] * xp[c];
        }
      }
    }
  }
}

// x86-64-v4 / v3 / baseline copies (isa.h)
DCLS_MM_ISA_VARIANTS(accumulate_row,
                     (const float* __restrict x, const float* __restrict g,
                      float* __restrict acc, const Geometry& s, int64_t c0, int64_t cb,
                      int64_t ky),
                     (x, g, acc, s, c0, cb, ky))

std::string set_cpu_isa(const std::string& capability) {
  return dcls_mm_isa::set_level_for_capability(capability);
}

at::Tensor depthwise_kernel_grad(const at::Tensor& x, const at::Tensor& grad_out, int64_t kh,
                                 int64_t kw, int64_t pad_top, int64_t pad_left,
                                 int64_t stride_h, int64_t stride_w) {
  TORCH_CHECK(x.device().is_cpu() && grad_out.device().is_cpu(),
              "dcls_mm::depthwise_kernel_grad: tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && grad_out.scalar_type() == at::kFloat,
              "dcls_mm::depthwise_kernel_grad: float32 tensors expected, got ",
              x.scalar_type(), " and ", grad_out.scalar_type());
  TORCH_CHECK(x.dim() == 4 && grad_out.dim() == 4,
              "dcls_mm::depthwise_kernel_grad: x and grad_out must be (N, C, H, W)");
  TORCH_CHECK(x.size(0) == grad_out.size(0) && x.size(1) == grad_out.size(1),
              "dcls_mm::depthwise_kernel_grad: x ", x.sizes(), " and grad_out ",
              grad_out.sizes(), " differ in batch or channels");
  TORCH_CHECK(kh > 0 && kw > 0 && stride_h > 0 && stride_w > 0 && pad_top >= 0 &&
                  pad_left >= 0,
              "dcls_mm::depthwise_kernel_grad: kernel size and stride must be positive and "
              "padding non-negative");
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(cl);
  const at::Tensor gc = grad_out.contiguous(cl);
  const Geometry s{x.size(0), x.size(1), x.size(2), x.size(3), grad_out.size(2),
                   grad_out.size(3), kh, kw, pad_top, pad_left, stride_h, stride_w};
  // (kh, kw, C): rows of the output are written by one work item each
  at::Tensor out = at::zeros({kh, kw, s.C}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* gp = gc.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t blocks = ceil_div(s.C, kChannelBlock);
  at::parallel_for(0, blocks * kh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kw * kChannelBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c0 = (item / kh) * kChannelBlock, ky = item % kh;
      const int64_t cb = std::min(kChannelBlock, s.C - c0);
      accumulate_row(xp, gp, acc.data(), s, c0, cb, ky);
      for (int64_t j = 0; j < kw; ++j)
        std::copy_n(acc.data() + j * kChannelBlock, cb, op + (ky * kw + j) * s.C + c0);
    }
  });
  return out.permute({2, 0, 1}).unsqueeze(1);
}

}  // namespace

TORCH_LIBRARY(dcls_mm, m) {
  m.def(
      "depthwise_kernel_grad(Tensor x, Tensor grad_out, int kh, int kw, int pad_top, "
      "int pad_left, int stride_h, int stride_w) -> Tensor");
  // which copy of the hot loops runs (isa.h); set from torch's CPU capability at load
  m.def("set_cpu_isa(str capability) -> str", &set_cpu_isa);
}

TORCH_LIBRARY_IMPL(dcls_mm, CPU, m) {
  m.impl("depthwise_kernel_grad", &depthwise_kernel_grad);
}
