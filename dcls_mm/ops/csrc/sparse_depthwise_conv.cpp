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
// output tile (rows x columns in registers) over its channel's non-zero taps, in runs of
// vertically adjacent taps (see Run), and copies the tile back to channels_last. The
// taps are added column by column (the dense kernels go row by row: the same sum up to
// float rounding); a zero weight is skipped, which differs only where x is inf or NaN
// (0 * inf would be NaN).
//
// Work per output: the non-zero taps instead of all of them, but the loads are unaligned
// (the dense kernels' are aligned) and the copies to and from the planes cost about two
// passes over the tensors; so it is one candidate of the measured route `conv`
// (dcls_mm.ops.depthwise), keyed by the kernel's density. The kernel gradient over a
// support (the taps a DCLS construction reads) works on the same planes and runs.
//
// The sums also multiply the planes' zero padding: on a 14x14 map with a 17x17 kernel
// ~30% of a run's rows are padding. Skipping them per run (a test and branch per row,
// runs sorted by kernel row so that neighbours skip alike) made the forward 16-39%
// slower at 384@14 and 768@7 (AVX-512, alternating A/B; the branches are most likely
// mispredicted: their pattern changes with every kernel row, and a channel has only a
// few dozen runs), so the padding rows are not skipped.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "isa.h"

namespace {

using dcls_mm_isa::Floats;
using dcls_mm_isa::load;
using dcls_mm_isa::store;
using dcls_mm_isa::transpose_block;

constexpr int64_t kBlock = 16;  // channels per work item

// The forward's unit: up to kMaxRun non-zero taps of one kernel column on consecutive
// rows (a bilinear element's 2x2 taps, a triangle element's 3x3 or more, give runs of 2
// or 3). One load of an input row feeds every tap of the run whose output row is in the
// tile, so a run of m taps over R rows costs R + m - 1 loads instead of m * R.
constexpr int kMaxRun = 4;
struct Run {
  int32_t offset;  // i * plane row length + j of its first tap
  int32_t length;
  float weight[kMaxRun];
};

struct Geometry {
  int64_t N, C, H, W, Ho, Wo, kh, kw, pad_top, pad_left;
  int64_t Hl, Wl, Wol;  // plane rows and row length, output tile row length
};

// How many running sums (vectors) a tile keeps in registers: all the register file holds
// next to a run's up to 4 broadcast weights and the row loaded (24 of 32 zmm, 12 of 16
// ymm, 8 of 16 xmm). More rows per tile, fewer row loads per multiply-add (a run of m
// taps over R rows loads R + m - 1 rows); 24 instead of 16 zmm took 3-5% off the forward
// on 56x56 maps here.
template <int level>
constexpr int kTileSums = level == dcls_mm_isa::kV4 ? 24 : (level == dcls_mm_isa::kV3 ? 12 : 8);
// at most this many vectors across a row (a tile of fewer columns has more rows): with
// 12 ymm sums, 2 across (6 rows) loads fewer rows per multiply-add than 4 across (3 rows);
// the AVX2 copy's forward took 4-12% less time with 2 (ConvNeXt shapes, alternating A/B)
template <int level>
constexpr int kMaxRowVectors = level == dcls_mm_isa::kV3 ? 2 : 4;

// acc[r] += the run's M taps, for the R output rows from the one whose first input row
// is at p (vectors [0, WV * lanes) from p).
template <int level, int WV, int R, int M>
DCLS_MM_INLINE void add_run(typename dcls_mm_isa::Simd<level>::V (&acc)[R][WV],
                            const float* p, const float* __restrict weight, int64_t Wl) {
  using V = typename dcls_mm_isa::Simd<level>::V;
  constexpr int L = sizeof(V) / sizeof(float);
  V w[M];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) w[m] = V{} + weight[m];
#pragma GCC unroll 32
  for (int q = 0; q < R + M - 1; ++q) {
#pragma GCC unroll 4
    for (int v = 0; v < WV; ++v) {
      V x = load<V>(p + v * L);
      if constexpr (M > 1) DCLS_MM_IN_REGISTER(x);  // one read feeds up to M taps
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m)
        if (q - m >= 0 && q - m < R) acc[q - m][v] += w[m] * x;
    }
    // the next row by one addition: as p + q * Wl, GCC kept the row offsets of every q
    // live across the runs, spilling them into vector registers
    p += Wl;
    DCLS_MM_OPAQUE_POINTER(p);
  }
}

// Output rows [oy, oy + R) x vectors [col, col + WV * lanes) of one channel's plane.
template <int level, int WV, int R>
DCLS_MM_INLINE void tile(const float* __restrict plane, const Run* __restrict runs,
                         const int64_t* n_runs, float bias, float* __restrict out,
                         const Geometry& s, int64_t oy, int64_t col) {
  using V = typename dcls_mm_isa::Simd<level>::V;
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[R][WV] = {};
  const float* base = plane + oy * s.Wl + col;
  // the runs come sorted by length, n_runs[m - 1] of length m: a loop per length (a
  // switch on each run's length was mispredicted for a good share of them)
  const Run* run = runs;
  for (const Run* end = run + n_runs[0]; run < end; ++run)
    add_run<level, WV, R, 1>(acc, base + run->offset, run->weight, s.Wl);
  for (const Run* end = run + n_runs[1]; run < end; ++run)
    add_run<level, WV, R, 2>(acc, base + run->offset, run->weight, s.Wl);
  for (const Run* end = run + n_runs[2]; run < end; ++run)
    add_run<level, WV, R, 3>(acc, base + run->offset, run->weight, s.Wl);
  for (const Run* end = run + n_runs[3]; run < end; ++run)
    add_run<level, WV, R, 4>(acc, base + run->offset, run->weight, s.Wl);
  const V b = V{} + bias;  // added last, like the dense kernels
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < WV; ++v) store<V>(out + (oy + r) * s.Wol + col + v * L, acc[r][v] + b);
}

// The last `rows` (< R) output rows from oy, as one tile of that many rows (a tile of
// fewer rows would leave the multiply-adds waiting on each other on small maps).
template <int level, int WV, int R>
DCLS_MM_INLINE void last_rows(const float* plane, const Run* runs, const int64_t* n_runs,
                              float bias, float* out, const Geometry& s, int64_t oy, int64_t col,
                              int64_t rows) {
  if constexpr (R > 1) {
    if (rows == R - 1) tile<level, WV, R - 1>(plane, runs, n_runs, bias, out, s, oy, col);
    else last_rows<level, WV, R - 1>(plane, runs, n_runs, bias, out, s, oy, col, rows);
  }
}

// All output rows of vectors [col, col + WV * lanes): tiles of R rows, then the rest.
template <int level, int WV>
DCLS_MM_INLINE void column(const float* plane, const Run* runs, const int64_t* n_runs, float bias,
                           float* out, const Geometry& s, int64_t col) {
  constexpr int R = kTileSums<level> / WV;
  int64_t oy = 0;
  for (; oy + R <= s.Ho; oy += R) tile<level, WV, R>(plane, runs, n_runs, bias, out, s, oy, col);
  if (oy < s.Ho) last_rows<level, WV, R>(plane, runs, n_runs, bias, out, s, oy, col, s.Ho - oy);
}

// Op::run<level, WV>(s, col, args...) over the vectors that hold a row's Wo output
// columns: chunks of MaxWV, then one chunk of the rest. Not over all of the Wol columns:
// with 8 lanes a 56-wide map is 7 vectors, not 8. The tile rows' columns past them are
// then never written (the copy back loads whole vectors but stores only the map's
// columns, whichever copy runs it; the kernel gradient's are zero).
template <int level, int MaxWV, typename Op, typename... Args>
DCLS_MM_INLINE void over_columns(const Geometry& s, Args... args) {
  constexpr int L = sizeof(typename dcls_mm_isa::Simd<level>::V) / sizeof(float);
  const int64_t vectors = (s.Wo + L - 1) / L;
  int64_t v = 0;
  for (; v + MaxWV <= vectors; v += MaxWV) Op::template run<level, MaxWV>(s, v * L, args...);
  if constexpr (MaxWV > 3) {
    if (vectors - v == 3) Op::template run<level, 3>(s, v * L, args...);
  }
  if constexpr (MaxWV > 2) {
    if (vectors - v == 2) Op::template run<level, 2>(s, v * L, args...);
  }
  if constexpr (MaxWV > 1) {
    if (vectors - v == 1) Op::template run<level, 1>(s, v * L, args...);
  }
}

struct ForwardColumn {
  template <int level, int WV>
  static DCLS_MM_INLINE void run(const Geometry& s, int64_t col, const float* plane,
                                 const Run* runs, const int64_t* n_runs, float bias, float* out) {
    column<level, WV>(plane, runs, n_runs, bias, out, s, col);
  }
};

// One channel: its zero-padded plane -> its output tile (Ho x Wol, row-major).
template <int level>
DCLS_MM_INLINE void channel_impl(const float* __restrict plane, const Run* __restrict runs,
                                 const int64_t* n_runs, float bias, float* __restrict out,
                                 const Geometry& s) {
  over_columns<level, kMaxRowVectors<level>, ForwardColumn>(s, plane, runs, n_runs, bias, out);
}
DCLS_MM_ISA_LEVEL_VARIANTS(channel,
                           (const float* __restrict plane, const Run* __restrict runs,
                            const int64_t* n_runs, float bias, float* __restrict out,
                            const Geometry& s),
                           (plane, runs, n_runs, bias, out, s))

// v with lane l moved to lane l - shift (lanes wrap around).
template <typename V, int shift, size_t... I>
DCLS_MM_INLINE V rotate_lanes(V v, std::index_sequence<I...>) {
  constexpr int L = sizeof(V) / sizeof(float);
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  return __builtin_shuffle(v, VI{static_cast<int32_t>((I + shift) % L)...});
}

// The sum of a vector's lanes, halves added in a tree (lane by lane, GCC extracted each
// lane: on 14x14 maps that took more time than the multiply-adds).
template <typename V, int width = sizeof(V) / sizeof(float)>
DCLS_MM_INLINE float horizontal_sum(V v) {
  if constexpr (width == 1) {
    float first;
    std::memcpy(&first, &v, sizeof first);
    return first;
  } else {
    constexpr auto lanes = std::make_index_sequence<sizeof(V) / sizeof(float)>{};
    return horizontal_sum<V, width / 2>(v + rotate_lanes<V, width / 2>(v, lanes));
  }
}

// Kernel gradient of one run of M taps (rows i .. i + M - 1 of one kernel column) over
// all output rows of vectors [col, col + WV * lanes), added to sums[0..M):
//   sums[m] += sum_{oy, ox} g[oy, ox] * plane[oy + i + m, ox + j]
// Output row oy meets input rows oy + i .. oy + i + M - 1, and the next output row all
// but the first of them again: a window of M input rows stays in registers and each
// output row loads one new input row and its gradient row, 2 WV loads for M WV
// multiply-adds (a tap at a time: a load per multiply-add, most of them unaligned
// across two cache lines, and the loads bound the loop). Each sum adds the output rows
// in order.
template <int level, int WV, int M>
DCLS_MM_INLINE void grad_run(const float* __restrict plane, const float* __restrict gplane,
                             int32_t offset, float* __restrict sums, const Geometry& s,
                             int64_t col) {
  using V = typename dcls_mm_isa::Simd<level>::V;
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[M][WV] = {}, rows[M][WV];
  const float* xp = plane + offset + col;  // input row oy + i, at output row oy = 0
  const float* gp = gplane + col;
#pragma GCC unroll 4
  for (int m = 0; m + 1 < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < WV; ++v) rows[m][v] = load<V>(xp + m * s.Wl + v * L);
  xp += (M - 1) * s.Wl;  // the row that output row oy adds to the window
  for (int64_t oy = 0; oy < s.Ho;) {
    // M steps per pass, so that the window's slots are compile-time registers: at step
    // k the window's first row is in slot k
#pragma GCC unroll 4
    for (int k = 0; k < M; ++k) {
      if (oy == s.Ho) break;
      V gv[WV];
#pragma GCC unroll 4
      for (int v = 0; v < WV; ++v) {
        rows[(k + M - 1) % M][v] = load<V>(xp + v * L);
        gv[v] = load<V>(gp + v * L);
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < WV; ++v) acc[m][v] += gv[v] * rows[(k + m) % M][v];
      xp += s.Wl;
      gp += s.Wol;
      DCLS_MM_OPAQUE_POINTER(xp);
      DCLS_MM_OPAQUE_POINTER(gp);
      ++oy;
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    V total = acc[m][0];
#pragma GCC unroll 4
    for (int v = 1; v < WV; ++v) total += acc[m][v];
    sums[m] += horizontal_sum(total);
  }
}

// Every run of one channel over vectors [col, col + WV * lanes): the runs come sorted by
// length, n_runs[m - 1] of length m (run_lists); their taps' sums follow in that order.
template <int level, int WV>
DCLS_MM_INLINE void grad_column(const float* plane, const float* gplane, const Run* runs,
                                const int64_t* n_runs, float* sums, const Geometry& s,
                                int64_t col) {
  const Run* run = runs;
  for (const Run* end = run + n_runs[0]; run < end; ++run, sums += 1)
    grad_run<level, WV, 1>(plane, gplane, run->offset, sums, s, col);
  for (const Run* end = run + n_runs[1]; run < end; ++run, sums += 2)
    grad_run<level, WV, 2>(plane, gplane, run->offset, sums, s, col);
  for (const Run* end = run + n_runs[2]; run < end; ++run, sums += 3)
    grad_run<level, WV, 3>(plane, gplane, run->offset, sums, s, col);
  for (const Run* end = run + n_runs[3]; run < end; ++run, sums += 4)
    grad_run<level, WV, 4>(plane, gplane, run->offset, sums, s, col);
}

struct GradColumn {
  template <int level, int WV>
  static DCLS_MM_INLINE void run(const Geometry& s, int64_t col, const float* plane,
                                 const float* gplane, const Run* runs, const int64_t* n_runs,
                                 float* sums) {
    grad_column<level, WV>(plane, gplane, runs, n_runs, sums, s, col);
  }
};

// At most this many vectors across a row for the kernel gradient: a run of 4 taps keeps
// 4 WV sums, 4 WV window rows and WV gradient vectors in registers (3 zmm across: 27 of
// 32; 2 ymm: 18 of 16, a few spills for the runs of 4, which bilinear and triangle
// kernels rarely have; with 1 ymm the AVX2 copy ran 10-30% slower on 56x56 maps, every
// run repeated per vector across).
template <int level>
constexpr int kGradRowVectors = level == dcls_mm_isa::kV4 ? 3 : 2;

// One channel of one image: sums[t] += the gradient of its t-th tap in run order.
template <int level>
DCLS_MM_INLINE void grad_channel_impl(const float* __restrict plane,
                                      const float* __restrict gplane,
                                      const Run* __restrict runs, const int64_t* n_runs,
                                      float* __restrict sums, const Geometry& s) {
  over_columns<level, kGradRowVectors<level>, GradColumn>(s, plane, gplane, runs, n_runs,
                                                          sums);
}
DCLS_MM_ISA_LEVEL_VARIANTS(grad_channel,
                           (const float* __restrict plane, const float* __restrict gplane,
                            const Run* __restrict runs, const int64_t* n_runs,
                            float* __restrict sums, const Geometry& s),
                           (plane, gplane, runs, n_runs, sums, s))

// Plane rows are whole blocks of this many floats, the widest vector of any copy: the
// geometry then does not depend on which copy runs (the copy is read again inside each
// dispatched call, and another thread may switch it in between).
constexpr int64_t kRowBlock = 16;

// The geometry of a stride-1 convolution of x (N, C, H, W) with a (kh, kw) kernel and the
// padding, in planes of whole row blocks.
Geometry geometry(const char* name, const at::Tensor& x, int64_t kh, int64_t kw,
                  int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  TORCH_CHECK(pad_top >= 0 && pad_bottom >= 0 && pad_left >= 0 && pad_right >= 0, name,
              ": padding must not be negative");
  Geometry s{x.size(0), x.size(1), x.size(2), x.size(3),
             x.size(2) + pad_top + pad_bottom - kh + 1, x.size(3) + pad_left + pad_right - kw + 1,
             kh, kw, pad_top, pad_left, 0, 0, 0};
  TORCH_CHECK(s.Ho > 0 && s.Wo > 0, name, ": the padded input is smaller than the kernel");
  s.Wol = (s.Wo + kRowBlock - 1) / kRowBlock * kRowBlock;  // the extra columns are dropped
  // + kRowBlock: room for the copies' last block of pixels, stored whole (zeros past the
  // map); rounded up to whole blocks, so that every row of the (cache-line aligned) planes
  // starts a cache line
  s.Wl = (s.Wol + s.kw - 1 + 2 * kRowBlock - 1) / kRowBlock * kRowBlock;
  s.Hl = s.Ho + s.kh - 1;
  TORCH_CHECK(s.Hl * s.Wl <= INT32_MAX, name, ": the padded map is too large");
  return s;
}


// Channels [c0, c0 + cb) of image n of the channels_last (N, rows, cols, C) tensor src
// into cb planes of `stride` floats, at row top and column left of rows of `length`:
// blocks of lanes x lanes transposed in registers (a scalar copy took a third of the
// sparse forward's time), the last block of a row padded with zeros (a row needs room
// for lanes - 1 columns after the map's), channels short of a vector one by one.
template <int level>
DCLS_MM_INLINE void copy_to_planes_impl(const float* __restrict src, int64_t n, int64_t rows,
                                        int64_t cols, int64_t C, int64_t c0, int64_t cb,
                                        float* __restrict planes, int64_t stride,
                                        int64_t length, int64_t top, int64_t left) {
  using V = typename dcls_mm_isa::Simd<level>::V;
  constexpr int L = sizeof(V) / sizeof(float);
  const int64_t cv = cb / L * L;  // channels in whole vectors
  for (int64_t h = 0; h < rows; ++h) {
    const float* from = src + (n * rows + h) * cols * C + c0;
    float* to = planes + (h + top) * length + left;
    // the last block of pixels: zeros after them (the planes have room for L)
    for (int64_t w = 0; w < cols; w += L)
      for (int64_t c = 0; c < cv; c += L)
        transpose_block<V>(from + w * C + c, C, std::min<int64_t>(L, cols - w),
                           to + c * stride + w, stride, L);
    for (int64_t c = cv; c < cb; ++c)  // channels short of a vector
      for (int64_t x = 0; x < cols; ++x) to[c * stride + x] = from[x * C + c];
  }
}
DCLS_MM_ISA_LEVEL_VARIANTS(copy_to_planes,
                           (const float* __restrict src, int64_t n, int64_t rows, int64_t cols,
                            int64_t C, int64_t c0, int64_t cb, float* __restrict planes,
                            int64_t stride, int64_t length, int64_t top, int64_t left),
                           (src, n, rows, cols, C, c0, cb, planes, stride, length, top, left))

// The inverse for the output: cb planes (rows x length, the first cols columns; length
// a whole number of vectors) into channels [c0, c0 + cb) of image n of the channels_last
// (N, rows, cols, C) tensor dst.
template <int level>
DCLS_MM_INLINE void copy_from_planes_impl(const float* __restrict planes, int64_t stride,
                                          int64_t length, float* __restrict dst, int64_t n,
                                          int64_t rows, int64_t cols, int64_t C, int64_t c0,
                                          int64_t cb) {
  using V = typename dcls_mm_isa::Simd<level>::V;
  constexpr int L = sizeof(V) / sizeof(float);
  const int64_t cv = cb / L * L;
  for (int64_t h = 0; h < rows; ++h) {
    const float* from = planes + h * length;
    float* to = dst + (n * rows + h) * cols * C + c0;
    for (int64_t w = 0; w < cols; w += L)  // (the planes' rows hold whole vectors)
      for (int64_t c = 0; c < cv; c += L)
        transpose_block<V>(from + c * stride + w, stride, L, to + w * C + c, C,
                           std::min<int64_t>(L, cols - w));
    for (int64_t c = cv; c < cb; ++c)  // channels short of a vector
      for (int64_t x = 0; x < cols; ++x) to[x * C + c] = from[c * stride + x];
  }
}
DCLS_MM_ISA_LEVEL_VARIANTS(copy_from_planes,
                           (const float* __restrict planes, int64_t stride, int64_t length,
                            float* __restrict dst, int64_t n, int64_t rows, int64_t cols,
                            int64_t C, int64_t c0, int64_t cb),
                           (planes, stride, length, dst, n, rows, cols, C, c0, cb))

// Bit i of bits[b * kw + j]: whether tap (32 b + i, j) of one channel's (kh, kw) kernel k
// is not zero, for vectors of columns at a time (a compare and an OR per row and vector;
// bit by bit, with a branch-free compare per tap, this took ~a quarter of run_lists).
// `left`: floats readable from k (the last channel's last row may end a tensor).
template <int level>
DCLS_MM_INLINE void column_bits_impl(const float* __restrict k, int64_t kh, int64_t kw,
                                     int64_t left, uint32_t* __restrict bits) {
  using V = typename dcls_mm_isa::Simd<level>::V;
  constexpr int L = sizeof(V) / sizeof(float);
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  for (int64_t j0 = 0; j0 < kw; j0 += L) {
    const int64_t lanes = std::min<int64_t>(L, kw - j0);
    for (int64_t i0 = 0; i0 < kh; i0 += 32) {
      VI found = {};
      for (int64_t i = i0; i < std::min<int64_t>(kh, i0 + 32); ++i) {
        const int64_t at = i * kw + j0;
        V x;
        if (at + L <= left) {
          x = load<V>(k + at);  // lanes past the row: the next row's taps, not used
        } else {
          float tail[L] = {};
          std::memcpy(tail, k + at, sizeof(float) * lanes);
          x = load<V>(tail);
        }
        found |= (x != 0.0f) & static_cast<int32_t>(uint32_t{1} << (i - i0));  // true: -1
      }
      int32_t out[L];
      std::memcpy(out, &found, sizeof out);
      for (int64_t l = 0; l < lanes; ++l)
        bits[i0 / 32 * kw + j0 + l] = static_cast<uint32_t>(out[l]);
    }
  }
}
DCLS_MM_ISA_LEVEL_VARIANTS(column_bits,
                           (const float* __restrict k, int64_t kh, int64_t kw, int64_t left,
                            uint32_t* __restrict bits),
                           (k, kh, kw, left, bits))

// Each channel's runs of non-zero taps of `values` (C, kh, kw), column by column, top to
// bottom, then sorted by length (stable): counts[c * kMaxRun + m - 1] runs of length m
// from runs + c * kh * kw. Runs split at every 32nd row (column_bits' words).
void run_lists(const float* values, const Geometry& s, Run* runs, int64_t* counts) {
  const int64_t per_channel = s.kh * s.kw, words = (s.kh + 31) / 32;
  at::parallel_for(0, s.C, 16, [&](int64_t begin, int64_t end) {
    // runs of length m + 1 go to found[m * per_channel + ...], then list them in order
    std::vector<Run> found(static_cast<size_t>(kMaxRun * per_channel));
    std::vector<uint32_t> bits(static_cast<size_t>(words * s.kw));
    for (int64_t c = begin; c < end; ++c) {
      const float* k = values + c * per_channel;
      column_bits(k, s.kh, s.kw, (s.C - c) * per_channel, bits.data());
      int64_t* groups = counts + c * kMaxRun;
      std::fill(groups, groups + kMaxRun, 0);
      for (int64_t j = 0; j < s.kw; ++j)
        for (int64_t w = 0; w < words; ++w) {
          const int64_t i0 = 32 * w, rows = std::min<int64_t>(32, s.kh - i0);
          const float* col = k + i0 * s.kw + j;
          for (uint32_t b = bits[w * s.kw + j]; b;) {
            const int first = __builtin_ctz(b);
            const uint32_t rest = ~(b >> first);  // run length: the ones from `first`
            const int length = std::min(rest ? __builtin_ctz(rest) : 32 - first, kMaxRun);
            Run& run = found[(length - 1) * per_channel + groups[length - 1]++];
            run.offset = static_cast<int32_t>((i0 + first) * s.Wl + j);
            run.length = length;
            // all kMaxRun weights, those past the run 0: no branch on the length
            for (int m = 0; m < kMaxRun; ++m) {
              const float v = col[std::min<int64_t>(first + m, rows - 1) * s.kw];
              run.weight[m] = m < length ? v : 0.f;
            }
            b &= ~(((uint32_t{1} << length) - 1) << first);
          }
        }
      Run* list = runs + c * per_channel;
      for (int m = 0; m < kMaxRun; ++m)
        list = std::copy_n(found.data() + m * per_channel, groups[m], list);
    }
  });
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
  std::unique_ptr<Run[]> runs(new Run[s.C * per_channel]);  // not zeroed
  std::vector<int64_t> counts(static_cast<size_t>(s.C * kMaxRun));
  run_lists(k.const_data_ptr<float>(), s, runs.get(), counts.data());

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
    Floats planes(static_cast<size_t>(kBlock * plane), 0.f);
    Floats tiles(static_cast<size_t>(kBlock * out_plane));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * kBlock;
      const int64_t cb = std::min(kBlock, s.C - c0);
      copy_to_planes(xp, n, s.H, s.W, s.C, c0, cb, planes.data(), plane, s.Wl, s.pad_top,
                     s.pad_left);
      for (int64_t c = 0; c < cb; ++c)
        channel(planes.data() + c * plane, runs.get() + (c0 + c) * per_channel,
                counts.data() + (c0 + c) * kMaxRun, bp ? bp[c0 + c] : 0.f,
                tiles.data() + c * out_plane, s);
      copy_from_planes(tiles.data(), out_plane, s.Wol, op, n, s.Ho, s.Wo, s.C, c0, cb);
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
  std::unique_ptr<Run[]> runs(new Run[s.C * per_channel]);  // not zeroed
  std::vector<int64_t> n_runs(static_cast<size_t>(s.C * kMaxRun));
  run_lists(mask.const_data_ptr<float>(), s, runs.get(), n_runs.data());
  // each channel's taps in run order, their sums packed: first[c] is channel c's first
  std::vector<int64_t> first(static_cast<size_t>(s.C + 1));
  for (int64_t c = 0; c < s.C; ++c) {
    int64_t taps = 0;
    for (int m = 1; m <= kMaxRun; ++m) taps += m * n_runs[c * kMaxRun + m - 1];
    first[c + 1] = first[c] + taps;
  }

  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor gc = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  const float* xp = xc.const_data_ptr<float>();
  const float* gp = gc.const_data_ptr<float>();
  std::vector<float> sums(static_cast<size_t>(s.N * first[s.C]), 0.f);
  const int64_t blocks = (s.C + kBlock - 1) / kBlock;
  const int64_t plane = s.Hl * s.Wl, gplane = s.Ho * s.Wol;
  at::parallel_for(0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
    // padding and the columns past Wo stay zero: every item writes the same interior
    Floats planes(static_cast<size_t>(kBlock * plane), 0.f);
    Floats gplanes(static_cast<size_t>(kBlock * gplane), 0.f);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * kBlock;
      const int64_t cb = std::min(kBlock, s.C - c0);
      copy_to_planes(xp, n, s.H, s.W, s.C, c0, cb, planes.data(), plane, s.Wl, s.pad_top,
                     s.pad_left);
      copy_to_planes(gp, n, s.Ho, s.Wo, s.C, c0, cb, gplanes.data(), gplane, s.Wol, 0, 0);
      for (int64_t c = 0; c < cb; ++c)
        grad_channel(planes.data() + c * plane, gplanes.data() + c * gplane,
                     runs.get() + (c0 + c) * per_channel, n_runs.data() + (c0 + c) * kMaxRun,
                     sums.data() + n * first[s.C] + first[c0 + c], s);
    }
  });
  at::Tensor out = at::zeros({s.C, 1, s.kh, s.kw}, x.options().memory_format(
                                                       at::MemoryFormat::Contiguous));
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, s.C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Run* run = runs.get() + c * per_channel;
      int64_t t = first[c];
      for (int m = 1; m <= kMaxRun; ++m)
        for (int64_t r = 0; r < n_runs[c * kMaxRun + m - 1]; ++r, ++run)
          for (int k = 0; k < m; ++k, ++t) {
            float total = 0.f;
            for (int64_t n = 0; n < s.N; ++n) total += sums[n * first[s.C] + t];
            const int32_t off = run->offset + k * static_cast<int32_t>(s.Wl);
            op[(c * s.kh + off / s.Wl) * s.kw + off % s.Wl] = total;
          }
    }
  });
  return out;
}

// How many of n floats are not zero, a vector at a time (the scalar loop took ~0.4 ms on
// a 384-channel 23x23 kernel, a quarter of that layer's inference convolution).
template <typename V>
DCLS_MM_INLINE int64_t count_nonzero_vectors(const float* __restrict p, int64_t n) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  constexpr int64_t L = sizeof(V) / sizeof(float);
  int64_t count = 0, i = 0;
  while (i + L <= n) {
    // lane counts stay far below 2^31: flushed every 2^20 vectors
    VI lanes = {};
    for (const int64_t stop = std::min(n - L + 1, i + (int64_t{1} << 20) * L); i < stop; i += L)
      lanes -= load<V>(p + i) != 0.0f;  // true is -1
    int32_t sums[L];
    std::memcpy(sums, &lanes, sizeof sums);
    for (int l = 0; l < L; ++l) count += sums[l];
  }
  for (; i < n; ++i) count += p[i] != 0.0f;
  return count;
}

template <int level>
DCLS_MM_INLINE void count_nonzero_impl(const float* __restrict p, int64_t n,
                                       int64_t* __restrict out) {
  *out = count_nonzero_vectors<typename dcls_mm_isa::Simd<level>::V>(p, n);
}
DCLS_MM_ISA_LEVEL_VARIANTS(count_nonzero,
                           (const float* __restrict p, int64_t n, int64_t* __restrict out),
                           (p, n, out))

// How many elements of a float32 tensor are not zero (torch.count_nonzero took 0.5 ms on
// a 384-channel 23x23 kernel; this runs for every route-key lookup of the sparse routes).
int64_t nonzero_count(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
              "dcls_mm::nonzero_count: a float32 CPU tensor expected");
  const at::Tensor c = t.contiguous();
  int64_t count = 0;
  count_nonzero(c.const_data_ptr<float>(), c.numel(), &count);
  return count;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcls_mm, m) {
  m.def("sparse_depthwise_conv(Tensor x, Tensor kernel, Tensor? bias, int pad_top, "
        "int pad_bottom, int pad_left, int pad_right) -> Tensor");
  m.def("sparse_depthwise_kernel_grad(Tensor x, Tensor grad_out, Tensor support, int pad_top, "
        "int pad_bottom, int pad_left, int pad_right) -> Tensor");
  m.def("nonzero_count(Tensor t) -> int");
}

TORCH_LIBRARY_IMPL(dcls_mm, CPU, m) {
  m.impl("sparse_depthwise_conv", &sparse_depthwise_conv);
  m.impl("sparse_depthwise_kernel_grad", &sparse_depthwise_kernel_grad);
  m.impl("nonzero_count", &nonzero_count);
}
