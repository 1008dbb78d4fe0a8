// Kernel gradient of a depthwise 2-D convolution on the CPU, channels_last.
//
//   grad_k[c, 0, i, j] = sum_{n, y, x} g[n, c, y, x] * x_pad[n, c, s_h*y + i, s_w*x + j]
//
// PyTorch's own weight gradient for a large depthwise kernel costs tens of times the
// forward, and the FFT formulation used by the pure-PyTorch fallback has a fixed cost
// that dominates on ConvNeXt's small (14x14, 7x7) maps. Here every tap only visits the
// (y, x) where it meets the input (no padded buffer: on a 7x7 map a 13x13 kernel would
// otherwise do 3.4x the useful work), and the channels_last layout makes the innermost
// dimension a contiguous block of 16 channels, one vector value.
//
// Work items are (block of 16 channels, group of kernel rows). An item reads each output
// row of g once and, while it is in L1, adds its products into every row and tap of the
// group; a tile of taps keeps its running sums in registers over the whole row (the
// earlier loop kept them in memory: one load and store per four multiply-adds, 3x slower
// than oneDNN's forward at the same size).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "isa.h"

namespace {

using dcls_mm_isa::Block16;
using dcls_mm_isa::Floats;
using dcls_mm_isa::fma16;
using dcls_mm_isa::load16;
using dcls_mm_isa::store16;

constexpr int64_t kChannelBlock = 16;

struct Geometry {
  int64_t N, C, H, W, Ho, Wo, kh, kw, pad_top, pad_left, stride_h, stride_w;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// acc[t] += g[ox] * x[ox * s_w + first + t] for the taps t < TJ whose column lies in
// the map.
template <int level, int TJ>
DCLS_MM_INLINE void edge_column(
    typename Block16<level>::V (&acc)[TJ][Block16<level>::P], const float* __restrict grow,
    const float* __restrict xrow, const Geometry& s, int64_t first, int64_t ox) {
  typename Block16<level>::V gv[Block16<level>::P];
  load16<level>(gv, grow + ox * s.C);
  const int64_t col0 = ox * s.stride_w + first;
#pragma GCC unroll 8
  for (int t = 0; t < TJ; ++t) {
    const int64_t col = col0 + t;
    if (col >= 0 && col < s.W) fma16<level>(acc[t], gv, xrow + col * s.C);
  }
}

// Taps [j0, j0 + TJ) of one kernel row, one output row of g against its input row:
//   sums[t] += sum_ox g[ox] * x[ox * s_w + j0 + t - pad_left]  (zero outside the map)
template <int level, int TJ>
DCLS_MM_INLINE void row_taps(const float* __restrict grow, const float* __restrict xrow,
                             const Geometry& s, int64_t j0, float* __restrict sums) {
  using V = typename Block16<level>::V;
  constexpr int P = Block16<level>::P;
  constexpr int64_t B = kChannelBlock;
  V acc[TJ][P];
#pragma GCC unroll 8
  for (int t = 0; t < TJ; ++t) load16<level>(acc[t], sums + t * B);
  const int64_t first = j0 - s.pad_left;  // input column of tap j0 at ox = 0
  // [lo, hi): the output columns at which every tap of the tile meets the input
  const int64_t lo = std::min(s.Wo, first >= 0 ? 0 : ceil_div(-first, s.stride_w));
  const int64_t room = s.W - TJ - first;  // the largest ox * s_w that keeps them all inside
  const int64_t hi = std::max(lo, room < 0 ? 0 : std::min(s.Wo, room / s.stride_w + 1));
  for (int64_t ox = 0; ox < lo; ++ox) edge_column<level, TJ>(acc, grow, xrow, s, first, ox);
  int64_t ox = lo;
  if constexpr (level == dcls_mm_isa::kV4) {
    // stride 1, kColumns output columns at a time: input column u serves tap u - o of
    // output column o, so TJ + kColumns - 1 loads (kept in registers) feed kColumns TJ
    // multiply-adds (one column at a time: TJ + 1 loads for TJ, the loads bound the
    // loop). Each sum still adds its columns in order (the same bits). AVX-512 only: the
    // gradient vectors and the loaded column need registers that the AVX2 copy's tiles
    // (two ymm per sum) lack.
    constexpr int kColumns = 4;
    if (s.stride_w == 1) {
      for (; ox + kColumns <= hi; ox += kColumns) {
        V gv[kColumns][P];
#pragma GCC unroll 4
        for (int o = 0; o < kColumns; ++o) load16<level>(gv[o], grow + (ox + o) * s.C);
        const float* xp = xrow + (ox + first) * s.C;
#pragma GCC unroll 16
        for (int u = 0; u < TJ + kColumns - 1; ++u) {
          V xv[P];
          load16<level>(xv, xp + u * s.C);
#pragma GCC unroll 4
          for (int q = 0; q < P; ++q) {
            DCLS_MM_IN_REGISTER(xv[q]);
#pragma GCC unroll 4
            for (int o = 0; o < kColumns; ++o)
              if (u - o >= 0 && u - o < TJ) acc[u - o][q] += gv[o][q] * xv[q];
          }
        }
      }
    }
  }
  for (; ox < hi; ++ox) {
    V gv[P];
    load16<level>(gv, grow + ox * s.C);
    const float* xp = xrow + (ox * s.stride_w + first) * s.C;
#pragma GCC unroll 8
    for (int t = 0; t < TJ; ++t) fma16<level>(acc[t], gv, xp + t * s.C);
  }
  for (int64_t ox = hi; ox < s.Wo; ++ox) edge_column<level, TJ>(acc, grow, xrow, s, first, ox);
#pragma GCC unroll 8
  for (int t = 0; t < TJ; ++t) store16<level>(sums + t * B, acc[t]);
}

// Kernel rows [ky0, ky1) of the full channel block [c0, c0 + 16) into sums
// ((ky1 - ky0) x kw x 16), in tiles of as many taps as the level keeps in registers.
template <int level>
DCLS_MM_INLINE void accumulate_rows_impl(const float* __restrict x, const float* __restrict g,
                                         float* __restrict sums, const Geometry& s,
                                         int64_t c0, int64_t ky0, int64_t ky1) {
  constexpr int64_t B = kChannelBlock;
  constexpr int TJ = dcls_mm_isa::kSumRegisters<level>;
  std::fill(sums, sums + (ky1 - ky0) * s.kw * B, 0.0f);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t y = 0; y < s.Ho; ++y) {
      const float* grow = g + ((n * s.Ho + y) * s.Wo) * s.C + c0;
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const int64_t iy = y * s.stride_h + ky - s.pad_top;
        if (iy < 0 || iy >= s.H) continue;  // this kernel row misses the input here
        const float* xrow = x + ((n * s.H + iy) * s.W) * s.C + c0;
        float* row = sums + (ky - ky0) * s.kw * B;
        int64_t j = 0;
        for (; j + TJ <= s.kw; j += TJ) row_taps<level, TJ>(grow, xrow, s, j, row + j * B);
        // the last kw % TJ taps in tiles of 4, 2, 1
        if constexpr (TJ > 4) {
          if (s.kw - j >= 4) { row_taps<level, 4>(grow, xrow, s, j, row + j * B); j += 4; }
        }
        if constexpr (TJ > 2) {
          if (s.kw - j >= 2) { row_taps<level, 2>(grow, xrow, s, j, row + j * B); j += 2; }
        }
        if (j < s.kw) row_taps<level, 1>(grow, xrow, s, j, row + j * B);
      }
    }
  }
}

// x86-64-v4 / v3 / baseline copies (isa.h)
DCLS_MM_ISA_LEVEL_VARIANTS(accumulate_rows,
                           (const float* __restrict x, const float* __restrict g,
                            float* __restrict sums, const Geometry& s, int64_t c0,
                            int64_t ky0, int64_t ky1),
                           (x, g, sums, s, c0, ky0, ky1))

// The same for the last, partial block of cb < 16 channels (C % 16 != 0), element by
// element: a 16-wide load would read past the tensor's end.
void accumulate_rows_partial(const float* __restrict x, const float* __restrict g,
                             float* __restrict sums, const Geometry& s, int64_t c0,
                             int64_t cb, int64_t ky0, int64_t ky1) {
  constexpr int64_t B = kChannelBlock;
  std::fill(sums, sums + (ky1 - ky0) * s.kw * B, 0.0f);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t y = 0; y < s.Ho; ++y)
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const int64_t iy = y * s.stride_h + ky - s.pad_top;
        if (iy < 0 || iy >= s.H) continue;
        for (int64_t ox = 0; ox < s.Wo; ++ox) {
          const float* gp = g + ((n * s.Ho + y) * s.Wo + ox) * s.C + c0;
          const int64_t col0 = ox * s.stride_w - s.pad_left;
          const int64_t j_lo = std::max<int64_t>(0, -col0), j_hi = std::min(s.kw, s.W - col0);
          for (int64_t j = j_lo; j < j_hi; ++j) {
            const float* xp = x + ((n * s.H + iy) * s.W + col0 + j) * s.C + c0;
            float* a = sums + ((ky - ky0) * s.kw + j) * B;
            for (int64_t c = 0; c < cb; ++c) a[c] += gp[c] * xp[c];
          }
        }
      }
}

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
  // (kh, kw, C): every row of every channel block is written by one work item
  at::Tensor out = at::empty({kh, kw, s.C}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* gp = gc.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t blocks = ceil_div(s.C, kChannelBlock);
  // enough items for the threads (rows are split only when the channel blocks are too
  // few: each group reads the whole of g again); no sum depends on the split
  const int64_t groups = std::min(kh, ceil_div(2 * at::get_num_threads(), blocks));
  const int64_t rows = ceil_div(kh, groups);
  at::parallel_for(0, blocks * groups, 1, [&](int64_t begin, int64_t end) {
    Floats sums(rows * kw * kChannelBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c0 = (item / groups) * kChannelBlock;
      const int64_t ky0 = (item % groups) * rows, ky1 = std::min(kh, ky0 + rows);
      if (ky0 >= ky1) continue;
      const int64_t cb = std::min(kChannelBlock, s.C - c0);
      if (cb == kChannelBlock) accumulate_rows(xp, gp, sums.data(), s, c0, ky0, ky1);
      else accumulate_rows_partial(xp, gp, sums.data(), s, c0, cb, ky0, ky1);
      for (int64_t ky = ky0; ky < ky1; ++ky)
        for (int64_t j = 0; j < kw; ++j)
          std::copy_n(sums.data() + ((ky - ky0) * kw + j) * kChannelBlock, cb,
                      op + (ky * kw + j) * s.C + c0);
    }
  });
  return out.permute({2, 0, 1}).unsqueeze(1);
}

}  // namespace

namespace dcls_mm_isa {
// the one compiled set of copies of transpose_matrix_impl (isa.h), used by every file
DCLS_MM_ISA_LEVEL_VARIANTS(transpose_matrix,
                           (const float* __restrict src, int64_t src_step, int64_t rows,
                            int64_t cols, float* __restrict dst, int64_t dst_step),
                           (src, src_step, rows, cols, dst, dst_step))
}  // namespace dcls_mm_isa

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
