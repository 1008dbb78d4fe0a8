// Forward depthwise 2-D convolution (stride 1, zero padding) on the CPU that visits, for
// each channel, only the taps where that channel's kernel is not zero.
//
//   y[n, c, oy, ox] = b[c] + sum_{(i, j): k[c, i, j] != 0} k[c, i, j] * x[n, c, oy + i - pad_top, ox + j - pad_left]
//
// A trained DCLS kernel is sparse per channel (with positions spread over the dilated
// kernel: a bilinear 17x17 channel has ~37% of its taps non-zero, a triangle 23x23 one
// ~18%), but 16 neighbouring channels together use nearly every tap, so kernels that
// vectorise over channels (oneDNN's, depthwise_conv.cpp) cannot skip any. Here the
// vectors run along a row of one channel instead: each work item (image, 16 channels)
// copies its channels into zero-padded planes (no bounds checks in the sum), sums each
// output tile (rows x columns in registers) over its channel's list of non-zero taps,
// and copies the tile back to channels_last. The taps are added in row-major order, like
// the dense kernels, and a tap whose weight is zero only ever adds 0 * x (it differs only
// where x is inf or NaN, which this op does not propagate through zero weights).
//
// Work per output: the non-zero taps instead of all of them, but every tap is an
// unaligned load (the dense kernels' loads are aligned) and the copies to and from the
// planes cost about two passes over the tensors; so it is one candidate of the measured
// route `conv` (dcls_mm.ops.depthwise), keyed by the kernel's density.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "isa.h"

namespace {

using dcls_mm_isa::load;
using dcls_mm_isa::store;

constexpr int64_t kBlock = 16;  // channels per work item

struct Tap {
  int32_t offset;  // i * plane row length + j
  float weight;
};

struct Geometry {
  int64_t N, C, H, W, Ho, Wo, kh, kw, pad_top, pad_left;
  int64_t Hl, Wl, Wol;  // plane rows and row length, output tile row length
};

// How many running sums (vectors) a tile keeps in registers: 16 of 32 zmm, 12 of 16 ymm,
// 8 of 16 xmm (the rest hold the broadcast weight and addresses).
template <int level>
constexpr int kTileSums = level == dcls_mm_isa::kV4 ? 16 : (level == dcls_mm_isa::kV3 ? 12 : 8);
// at most this many vectors across a row (a tile of fewer columns has more rows)
constexpr int kMaxRowVectors = 4;

// Output rows [oy, oy + R) x vectors [col, col + WV * lanes) of one channel's plane.
template <int level, int WV, int R>
DCLS_MM_INLINE void tile(const float* __restrict plane, const Tap* __restrict taps, int64_t n_taps,
                         float bias, float* __restrict out, const Geometry& s, int64_t oy,
                         int64_t col) {
  using V = typename dcls_mm_isa::Simd<level>::V;
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[R][WV] = {};
  const float* base = plane + oy * s.Wl + col;
  for (int64_t t = 0; t < n_taps; ++t) {
    const float* p = base + taps[t].offset;
    const V w = V{} + taps[t].weight;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < WV; ++v) acc[r][v] += w * load<V>(p + r * s.Wl + v * L);
  }
  const V b = V{} + bias;  // added last, like the dense kernels
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < WV; ++v) store<V>(out + (oy + r) * s.Wol + col + v * L, acc[r][v] + b);
}

// The last `rows` (< R) output rows from oy, as one tile of that many rows (a tile of
// fewer rows would leave the multiply-adds waiting on each other on small maps).
template <int level, int WV, int R>
DCLS_MM_INLINE void last_rows(const float* plane, const Tap* taps, int64_t n_taps, float bias,
                              float* out, const Geometry& s, int64_t oy, int64_t col,
                              int64_t rows) {
  if constexpr (R > 1) {
    if (rows == R - 1) tile<level, WV, R - 1>(plane, taps, n_taps, bias, out, s, oy, col);
    else last_rows<level, WV, R - 1>(plane, taps, n_taps, bias, out, s, oy, col, rows);
  }
}

// All output rows of vectors [col, col + WV * lanes): tiles of R rows, then the rest.
template <int level, int WV>
DCLS_MM_INLINE void column(const float* plane, const Tap* taps, int64_t n_taps, float bias,
                           float* out, const Geometry& s, int64_t col) {
  constexpr int R = kTileSums<level> / WV;
  int64_t oy = 0;
  for (; oy + R <= s.Ho; oy += R) tile<level, WV, R>(plane, taps, n_taps, bias, out, s, oy, col);
  if (oy < s.Ho) last_rows<level, WV, R>(plane, taps, n_taps, bias, out, s, oy, col, s.Ho - oy);
}

// Op::run<level, WV>(s, col, args...) over a plane row's vectors: chunks of
// kMaxRowVectors, then one chunk of the rest.
template <int level, typename Op, typename... Args>
DCLS_MM_INLINE void over_columns(const Geometry& s, Args... args) {
  constexpr int L = sizeof(typename dcls_mm_isa::Simd<level>::V) / sizeof(float);
  const int64_t vectors = s.Wol / L;
  int64_t v = 0;
  for (; v + kMaxRowVectors <= vectors; v += kMaxRowVectors)
    Op::template run<level, kMaxRowVectors>(s, v * L, args...);
  switch (vectors - v) {
    case 3: Op::template run<level, 3>(s, v * L, args...); break;
    case 2: Op::template run<level, 2>(s, v * L, args...); break;
    case 1: Op::template run<level, 1>(s, v * L, args...); break;
    default: break;
  }
}

struct ForwardColumn {
  template <int level, int WV>
  static DCLS_MM_INLINE void run(const Geometry& s, int64_t col, const float* plane,
                                 const Tap* taps, int64_t n_taps, float bias, float* out) {
    column<level, WV>(plane, taps, n_taps, bias, out, s, col);
  }
};

// One channel: its zero-padded plane -> its output tile (Ho x Wol, row-major).
template <int level>
DCLS_MM_INLINE void channel_impl(const float* __restrict plane, const Tap* __restrict taps,
                                 int64_t n_taps, float bias, float* __restrict out,
                                 const Geometry& s) {
  over_columns<level, ForwardColumn>(s, plane, taps, n_taps, bias, out);
}
DCLS_MM_ISA_LEVEL_VARIANTS(channel,
                           (const float* __restrict plane, const Tap* __restrict taps,
                            int64_t n_taps, float bias, float* __restrict out,
                            const Geometry& s),
                           (plane, taps, n_taps, bias, out, s))

// Kernel gradient: the sums of T taps over all output rows of vectors
// [col, col + WV * lanes), added to sums[0..T).
//   sums[t] += sum_{oy, ox} g[oy, ox] * plane[oy + i_t, ox + j_t]
template <int level, int WV, int T>
DCLS_MM_INLINE void grad_tile(const float* __restrict plane, const float* __restrict gplane,
                              const Tap* __restrict taps, float* __restrict sums,
                              const Geometry& s, int64_t col) {
  using V = typename dcls_mm_isa::Simd<level>::V;
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[T][WV] = {};
  int32_t offsets[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) offsets[t] = taps[t].offset;
  for (int64_t oy = 0; oy < s.Ho; ++oy) {
    const float* grow = gplane + oy * s.Wol + col;
    const float* xrow = plane + oy * s.Wl + col;
    V gv[WV];
#pragma GCC unroll 4
    for (int v = 0; v < WV; ++v) gv[v] = load<V>(grow + v * L);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < WV; ++v) acc[t][v] += gv[v] * load<V>(xrow + offsets[t] + v * L);
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    V total = acc[t][0];
#pragma GCC unroll 4
    for (int v = 1; v < WV; ++v) total += acc[t][v];
    float sum = 0.f;
#pragma GCC unroll 16
    for (int l = 0; l < L; ++l) sum += total[l];
    sums[t] += sum;
  }
}

// The last `left` (< T) taps as one tile of that many.
template <int level, int WV, int T>
DCLS_MM_INLINE void grad_last_taps(const float* plane, const float* gplane, const Tap* taps,
                                   float* sums, const Geometry& s, int64_t col, int64_t left) {
  if constexpr (T > 1) {
    if (left == T - 1) grad_tile<level, WV, T - 1>(plane, gplane, taps, sums, s, col);
    else grad_last_taps<level, WV, T - 1>(plane, gplane, taps, sums, s, col, left);
  }
}

// All taps of one channel over vectors [col, col + WV * lanes): tiles of T taps.
template <int level, int WV>
DCLS_MM_INLINE void grad_column(const float* plane, const float* gplane, const Tap* taps,
                                int64_t n_taps, float* sums, const Geometry& s, int64_t col) {
  constexpr int T = kTileSums<level> / WV;
  int64_t t = 0;
  for (; t + T <= n_taps; t += T)
    grad_tile<level, WV, T>(plane, gplane, taps + t, sums + t, s, col);
  if (t < n_taps)
    grad_last_taps<level, WV, T>(plane, gplane, taps + t, sums + t, s, col, n_taps - t);
}

struct GradColumn {
  template <int level, int WV>
  static DCLS_MM_INLINE void run(const Geometry& s, int64_t col, const float* plane,
                                 const float* gplane, const Tap* taps, int64_t n_taps,
                                 float* sums) {
    grad_column<level, WV>(plane, gplane, taps, n_taps, sums, s, col);
  }
};

// One channel of one image: sums[t] += its tap t's gradient (taps in list order).
template <int level>
DCLS_MM_INLINE void grad_channel_impl(const float* __restrict plane,
                                      const float* __restrict gplane,
                                      const Tap* __restrict taps, int64_t n_taps,
                                      float* __restrict sums, const Geometry& s) {
  over_columns<level, GradColumn>(s, plane, gplane, taps, n_taps, sums);
}
DCLS_MM_ISA_LEVEL_VARIANTS(grad_channel,
                           (const float* __restrict plane, const float* __restrict gplane,
                            const Tap* __restrict taps, int64_t n_taps,
                            float* __restrict sums, const Geometry& s),
                           (plane, gplane, taps, n_taps, sums, s))

// lanes of the vectors the running copy uses (the output tile's rows are a multiple)
int64_t lanes() {
  switch (dcls_mm_isa::level()) {
    case dcls_mm_isa::kV4: return 16;
    case dcls_mm_isa::kV3: return 8;
    default: return 4;
  }
}

// The geometry of a stride-1 convolution of x (N, C, H, W) with a (kh, kw) kernel and the
// padding, in planes of whole vectors of the running copy.
Geometry geometry(const char* name, const at::Tensor& x, int64_t kh, int64_t kw,
                  int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  TORCH_CHECK(pad_top >= 0 && pad_bottom >= 0 && pad_left >= 0 && pad_right >= 0, name,
              ": padding must not be negative");
  Geometry s{x.size(0), x.size(1), x.size(2), x.size(3),
             x.size(2) + pad_top + pad_bottom - kh + 1, x.size(3) + pad_left + pad_right - kw + 1,
             kh, kw, pad_top, pad_left, 0, 0, 0};
  TORCH_CHECK(s.Ho > 0 && s.Wo > 0, name, ": the padded input is smaller than the kernel");
  const int64_t L = lanes();
  s.Wol = (s.Wo + L - 1) / L * L;  // whole vectors; the extra columns are dropped
  s.Wl = s.Wol + s.kw - 1;
  s.Hl = s.Ho + s.kh - 1;
  TORCH_CHECK(s.Hl * s.Wl <= INT32_MAX, name, ": the padded map is too large");
  return s;
}

// Each channel's taps where `values` (C, kh, kw) is not zero, row-major (the dense
// kernels' order), with their value; counts[c] of them from taps + c * kh * kw.
void tap_lists(const float* values, const Geometry& s, Tap* taps, int64_t* counts) {
  const int64_t per_channel = s.kh * s.kw;
  at::parallel_for(0, s.C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Tap* list = taps + c * per_channel;
      int64_t count = 0;
      for (int64_t i = 0; i < s.kh; ++i)
        for (int64_t j = 0; j < s.kw; ++j) {
          const float w = values[(c * s.kh + i) * s.kw + j];
          if (w != 0.f) list[count++] = Tap{static_cast<int32_t>(i * s.Wl + j), w};
        }
      counts[c] = count;
    }
  });
}

// Channels [c0, c0 + cb) of image n of the channels_last (N, rows, cols, C) tensor src
// into cb planes of `stride` floats, at row top and column left of rows of `length`.
void copy_to_planes(const float* __restrict src, int64_t n, int64_t rows, int64_t cols,
                    int64_t C, int64_t c0, int64_t cb, float* __restrict planes,
                    int64_t stride, int64_t length, int64_t top, int64_t left) {
  for (int64_t h = 0; h < rows; ++h)
    for (int64_t w = 0; w < cols; ++w) {
      const float* from = src + ((n * rows + h) * cols + w) * C + c0;
      float* to = planes + (h + top) * length + w + left;
      for (int64_t c = 0; c < cb; ++c) to[c * stride] = from[c];
    }
}

void check_inputs(const char* name, const at::Tensor& x, const at::Tensor& other) {
  TORCH_CHECK(x.device().is_cpu() && other.device().is_cpu(), name,
              ": tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && other.scalar_type() == at::kFloat, name,
              ": float32 tensors expected");
  TORCH_CHECK(x.dim() == 4, name, ": x must be (N, C, H, W), got ", x.sizes());
}

at::Tensor sparse_depthwise_conv(const at::Tensor& x, const at::Tensor& kernel,
                                 const c10::optional<at::Tensor>& bias, int64_t pad_top,
                                 int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  const char* name = "dcls_mm::sparse_depthwise_conv";
  check_inputs(name, x, kernel);
  TORCH_CHECK(kernel.dim() == 4 && kernel.size(0) == x.size(1) && kernel.size(1) == 1, name,
              ": x must be (N, C, H, W) and kernel (C, 1, kh, kw), got ", x.sizes(), ", ",
              kernel.sizes());
  const Geometry s = geometry(name, x, kernel.size(2), kernel.size(3), pad_top, pad_bottom,
                              pad_left, pad_right);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == s.C, name,
                ": bias must be float32 (C,), got ", b.sizes());
  }
  const at::Tensor k = kernel.contiguous();
  const int64_t per_channel = s.kh * s.kw;
  std::unique_ptr<Tap[]> taps(new Tap[s.C * per_channel]);  // not zeroed: 8 B a tap
  std::vector<int64_t> counts(static_cast<size_t>(s.C));
  tap_lists(k.const_data_ptr<float>(), s, taps.get(), counts.data());

  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({s.N, s.C, s.Ho, s.Wo},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* xp = xc.const_data_ptr<float>();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  const int64_t blocks = (s.C + kBlock - 1) / kBlock;
  const int64_t plane = s.Hl * s.Wl, out_plane = s.Ho * s.Wol;
  at::parallel_for(0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
    // the padding stays zero: every item writes the same interior
    std::vector<float> planes(static_cast<size_t>(kBlock * plane), 0.f);
    std::vector<float> tiles(static_cast<size_t>(kBlock * out_plane));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * kBlock;
      const int64_t cb = std::min(kBlock, s.C - c0);
      copy_to_planes(xp, n, s.H, s.W, s.C, c0, cb, planes.data(), plane, s.Wl, s.pad_top,
                     s.pad_left);
      for (int64_t c = 0; c < cb; ++c)
        channel(planes.data() + c * plane, taps.get() + (c0 + c) * per_channel,
                counts[c0 + c], bp ? bp[c0 + c] : 0.f, tiles.data() + c * out_plane, s);
      for (int64_t oy = 0; oy < s.Ho; ++oy)
        for (int64_t ox = 0; ox < s.Wo; ++ox) {
          float* dst = op + ((n * s.Ho + oy) * s.Wo + ox) * s.C + c0;
          const float* src = tiles.data() + oy * s.Wol + ox;
          for (int64_t c = 0; c < cb; ++c) dst[c] = src[c * out_plane];
        }
    }
  });
  return out;
}

// grad_k[c, 0, i, j] = sum_{n, oy, ox} g[n, c, oy, ox] * x_pad[n, c, oy + i, ox + j] where
// support[c, i, j], 0 elsewhere (stride 1). Work items (image, 16 channels) add into
// per-image sums, added over the images in order at the end (the result does not depend
// on the thread count).
at::Tensor sparse_depthwise_kernel_grad(const at::Tensor& x, const at::Tensor& grad_out,
                                        const at::Tensor& support, int64_t pad_top,
                                        int64_t pad_bottom, int64_t pad_left,
                                        int64_t pad_right) {
  const char* name = "dcls_mm::sparse_depthwise_kernel_grad";
  check_inputs(name, x, grad_out);
  TORCH_CHECK(support.dim() == 4 && support.size(0) == x.size(1) && support.size(1) == 1, name,
              ": support must be (C, 1, kh, kw) with C = x.size(1), got ", support.sizes());
  const Geometry s = geometry(name, x, support.size(2), support.size(3), pad_top, pad_bottom,
                              pad_left, pad_right);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.N && grad_out.size(1) == s.C &&
                  grad_out.size(2) == s.Ho && grad_out.size(3) == s.Wo,
              name, ": grad_out must be (", s.N, ", ", s.C, ", ", s.Ho, ", ", s.Wo, "), got ",
              grad_out.sizes());
  const at::Tensor mask = support.to(at::kFloat).contiguous();
  const int64_t per_channel = s.kh * s.kw;
  std::unique_ptr<Tap[]> taps(new Tap[s.C * per_channel]);
  std::vector<int64_t> counts(static_cast<size_t>(s.C)), first(static_cast<size_t>(s.C + 1));
  tap_lists(mask.const_data_ptr<float>(), s, taps.get(), counts.data());
  for (int64_t c = 0; c < s.C; ++c) first[c + 1] = first[c] + counts[c];  // packed sums

  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor gc = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  const float* xp = xc.const_data_ptr<float>();
  const float* gp = gc.const_data_ptr<float>();
  std::vector<float> sums(static_cast<size_t>(s.N * first[s.C]), 0.f);
  const int64_t blocks = (s.C + kBlock - 1) / kBlock;
  const int64_t plane = s.Hl * s.Wl, gplane = s.Ho * s.Wol;
  at::parallel_for(0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
    // padding and the columns past Wo stay zero: every item writes the same interior
    std::vector<float> planes(static_cast<size_t>(kBlock * plane), 0.f);
    std::vector<float> gplanes(static_cast<size_t>(kBlock * gplane), 0.f);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * kBlock;
      const int64_t cb = std::min(kBlock, s.C - c0);
      copy_to_planes(xp, n, s.H, s.W, s.C, c0, cb, planes.data(), plane, s.Wl, s.pad_top,
                     s.pad_left);
      copy_to_planes(gp, n, s.Ho, s.Wo, s.C, c0, cb, gplanes.data(), gplane, s.Wol, 0, 0);
      for (int64_t c = 0; c < cb; ++c)
        grad_channel(planes.data() + c * plane, gplanes.data() + c * gplane,
                     taps.get() + (c0 + c) * per_channel, counts[c0 + c],
                     sums.data() + n * first[s.C] + first[c0 + c], s);
    }
  });
  at::Tensor out = at::zeros({s.C, 1, s.kh, s.kw}, x.options().memory_format(
                                                       at::MemoryFormat::Contiguous));
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, s.C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      for (int64_t t = 0; t < counts[c]; ++t) {
        float total = 0.f;
        for (int64_t n = 0; n < s.N; ++n) total += sums[n * first[s.C] + first[c] + t];
        const int32_t off = taps[c * per_channel + t].offset;
        op[(c * s.kh + off / s.Wl) * s.kw + off % s.Wl] = total;
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcls_mm, m) {
  m.def("sparse_depthwise_conv(Tensor x, Tensor kernel, Tensor? bias, int pad_top, "
        "int pad_bottom, int pad_left, int pad_right) -> Tensor");
  m.def("sparse_depthwise_kernel_grad(Tensor x, Tensor grad_out, Tensor support, int pad_top, "
        "int pad_bottom, int pad_left, int pad_right) -> Tensor");
}

TORCH_LIBRARY_IMPL(dcls_mm, CPU, m) {
  m.impl("sparse_depthwise_conv", &sparse_depthwise_conv);
  m.impl("sparse_depthwise_kernel_grad", &sparse_depthwise_kernel_grad);
}
