// Triangle / gaussian DCLS kernel construction (2 learned dims) on the CPU, forward and
// backward.
//
//   a_d[b, k, i] = profile(i - (P[d, b, k] + L_d / 2), |SIG[d, b, k]| + offset)
//   S_d[b, k]    = sum_i a_d[b, k, i],        scale[b, k] = w[b, k] / (S_0 * S_1 + eps)
//   out[b, i, j] = sum_k scale[b, k] * a_0[b, k, i] * a_1[b, k, j]
//
// with b running over every (C_out, C_in/g) pair. In PyTorch the last line is a batched
// matmul of thousands of tiny (L x K) @ (K x L) products, which the CPU runs one small
// GEMM at a time (several ms per layer, more than the convolution). Here a block of 16
// b's is processed together with b innermost, so every multiply-add is one full vector
// lane-wise operation and the block's working set stays in L1/L2; blocks run in
// parallel. The exponential is a vectorisable polynomial (see fast_exp_neg).
//
// Both ops take a window: rows [r0, r0 + nr) and columns [c0, c0 + nc) of the L0 x L1
// kernel. Only those taps are built (and only their gradient is given to the backward);
// the profile sums S_d still run over the whole grid, so the taps equal those of the full
// kernel. A convolution on a feature map smaller than the kernel meets only part of it
// (a 7x7 map: 13 of 23 rows), and building the rest would be wasted work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "isa.h"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

using dcls_mm_isa::Floats;
using dcls_mm_isa::rows_to_block16;
using dcls_mm_isa::transpose_matrix;

constexpr int64_t kBlock = 16;
constexpr float kNormEps = 1e-7f;  // dcls_mm.ops.kernel.NORM_EPS
// dcls_mm.ops.kernel.GAUSSIAN_CUT * float32 eps (2^-9 * 2^-23)
constexpr float kGaussianCut = 0x1p-32f;

enum Interp : int64_t { kTriangle = 0, kGaussian = 1 };

// exp(x) for x <= 0, lane by lane on a GCC vector V, without a library call: Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for exp(r) (relative error
// ~2 float ulp), 2^n through the exponent bits. Below -87 (where exp underflows to
// denormals) it returns 0.
template <typename V>
DCLS_MM_INLINE V fast_exp_neg(V x) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  const V lowest = V{} - 87.0f;
  const V xc = x < lowest ? lowest : x;
  // round to nearest by the 1.5 * 2^23 trick (std::nearbyint is a library call)
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  VI bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += __builtin_convertvector(n, VI) << 23;
  V out;
  std::memcpy(&out, &bits, sizeof out);
  return x < lowest ? V{} : out;
}

// Gaussian tails multiply into denormal numbers (e.g. 1e-20 * 1e-20), which cost the
// CPU a microcode assist each (10x slower construction). They are flushed to zero while
// a work item runs (values below 1.2e-38, far below float32 resolution of the kernel).
class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

struct Shape {
  int64_t nb, K, L0, L1;
  int64_t interp;
};

// The 1-D profiles of one block and their sums, every array with b innermost:
// a0 [K][L0][B], a1 [K][L1][B], s0 and s1 [K][B]. The forward can hand them to the
// backward (`keep_profiles`), which then skips their evaluation (the exponentials are
// most of the construction's work); the layout in that tensor is the same, per block.
struct Profiles {
  float *a0, *a1, *s0, *s1;
};

int64_t profile_floats(const Shape& s) { return (s.K * (s.L0 + s.L1) + 2 * s.K) * kBlock; }

Profiles profiles_at(float* base, const Shape& s) {
  Profiles p;
  p.a0 = base;
  p.a1 = p.a0 + s.K * s.L0 * kBlock;
  p.s0 = p.a1 + s.K * s.L1 * kBlock;
  p.s1 = p.s0 + s.K * kBlock;
  return p;
}

// Per-thread scratch for one block of kBlock b's, every array with b innermost.
struct Scratch {
  Floats pos0, pos1, wid0, wid1;  // [K][B] grid positions, widths
  Floats scale, w;                // [K][B]
  Floats own;                     // profiles when none are kept
  // own_profiles: the block's profiles live here (else in the kept tensor)
  Scratch(const Shape& s, bool own_profiles)
      : pos0(s.K * kBlock), pos1(s.K * kBlock), wid0(s.K * kBlock), wid1(s.K * kBlock),
        scale(s.K * kBlock), w(s.K * kBlock), own(own_profiles ? profile_floats(s) : 0) {}
};

// The running sums are vectors of the level (GCC kept float arrays on the stack, a
// store and a reload around every add), the interpolation chosen outside the tap loop.
template <int level>
DCLS_MM_INLINE void profiles_impl(const float* __restrict pos, const float* __restrict wid,
                                  int64_t K, int64_t L, int64_t interp,
                                  float* __restrict a, float* __restrict sums) {
  using B = dcls_mm_isa::Block16<level>;
  using V = typename B::V;
  for (int64_t k = 0; k < K; ++k) {
    V p[B::P], w[B::P], inv[B::P], acc[B::P] = {};
    dcls_mm_isa::load16<level>(p, pos + k * kBlock);
    dcls_mm_isa::load16<level>(w, wid + k * kBlock);
    // one division per element instead of one per tap (a vector division costs ~10
    // multiplies); t differs from PyTorch's u / width by at most an ulp
#pragma GCC unroll 4
    for (int q = 0; q < B::P; ++q) inv[q] = (V{} + 1.0f) / w[q];
    float* ak = a + k * L * kBlock;
    if (interp == kGaussian) {
      for (int64_t i = 0; i < L; ++i) {
        V v[B::P];
#pragma GCC unroll 4
        for (int q = 0; q < B::P; ++q) {
          const V t = (static_cast<float>(i) - p[q]) * inv[q];
          v[q] = fast_exp_neg(-0.5f * (t * t));
          acc[q] += v[q];
        }
        dcls_mm_isa::store16<level>(ak + i * kBlock, v);
      }
    } else {
      for (int64_t i = 0; i < L; ++i) {
        V v[B::P];
#pragma GCC unroll 4
        for (int q = 0; q < B::P; ++q) {
          const V u = static_cast<float>(i) - p[q];
          const V d = w[q] - (u < 0.0f ? -u : u);
          v[q] = d <= 0.0f ? V{} : d;  // NaN (position or width) stays NaN, as relu
          acc[q] += v[q];
        }
        dcls_mm_isa::store16<level>(ak + i * kBlock, v);
      }
    }
    dcls_mm_isa::store16<level>(sums + k * kBlock, acc);
  }
}
DCLS_MM_ISA_LEVEL_VARIANTS(profiles,
                           (const float* __restrict pos, const float* __restrict wid,
                            int64_t K, int64_t L, int64_t interp, float* __restrict a,
                            float* __restrict sums),
                           (pos, wid, K, L, interp, a, sums))

// Register tiles of the contractions: TA x TB running sums of 16 floats (one zmm, two
// ymm or four xmm each) fed by TA + TB loads per step, so that the multiply-adds, not the
// loads, bound the loops (one output at a time took a load per multiply-add).
template <int level>
constexpr int kTileA = level == dcls_mm_isa::kV4 ? 4 : (level == dcls_mm_isa::kV3 ? 2 : 1);
template <int level>
constexpr int kTileB = level == dcls_mm_isa::kV4 ? 4 : (level == dcls_mm_isa::kV3 ? 3 : 2);

// out[a][b] = sum_{t < n} x[a * x_outer + t * x_inner] * y[b * y_outer + t * y_inner] for
// a < TA, b < TB (indices in blocks of 16 floats), t ascending: the order of the one-
// output-at-a-time loops it replaced (the same bits).
template <int level, int TA, int TB>
DCLS_MM_INLINE void dot_tile(const float* __restrict x, int64_t x_outer, int64_t x_inner,
                             const float* __restrict y, int64_t y_outer, int64_t y_inner,
                             int64_t n, float* __restrict out, int64_t out_outer,
                             int64_t out_inner) {
  using B = dcls_mm_isa::Block16<level>;
  using V = typename B::V;
  V acc[TA][TB][B::P] = {};
  for (int64_t t = 0; t < n; ++t) {
    V xv[TA][B::P], yv[TB][B::P];
#pragma GCC unroll 4
    for (int a = 0; a < TA; ++a)
      dcls_mm_isa::load16<level>(xv[a], x + (a * x_outer + t * x_inner) * kBlock);
#pragma GCC unroll 4
    for (int b = 0; b < TB; ++b)
      dcls_mm_isa::load16<level>(yv[b], y + (b * y_outer + t * y_inner) * kBlock);
#pragma GCC unroll 4
    for (int a = 0; a < TA; ++a)
#pragma GCC unroll 4
      for (int b = 0; b < TB; ++b)
#pragma GCC unroll 4
        for (int p = 0; p < B::P; ++p) acc[a][b][p] += xv[a][p] * yv[b][p];
  }
#pragma GCC unroll 4
  for (int a = 0; a < TA; ++a)
#pragma GCC unroll 4
    for (int b = 0; b < TB; ++b)
      dcls_mm_isa::store16<level>(out + (a * out_outer + b * out_inner) * kBlock, acc[a][b]);
}

// dot_tile over outputs [a, a + TA) x [0, nb): TB columns at a time, then one at a time.
template <int level, int TA>
DCLS_MM_INLINE void dot_rows(const float* x, int64_t x_outer, int64_t x_inner, const float* y,
                             int64_t y_outer, int64_t y_inner, int64_t n, int64_t a,
                             int64_t nb, float* out, int64_t out_outer, int64_t out_inner) {
  constexpr int TB = kTileB<level>;
  int64_t b = 0;
  for (; b + TB <= nb; b += TB)
    dot_tile<level, TA, TB>(x + a * x_outer * kBlock, x_outer, x_inner,
                            y + b * y_outer * kBlock, y_outer, y_inner, n,
                            out + (a * out_outer + b * out_inner) * kBlock, out_outer,
                            out_inner);
  for (; b < nb; ++b)
    dot_tile<level, TA, 1>(x + a * x_outer * kBlock, x_outer, x_inner,
                           y + b * y_outer * kBlock, y_outer, y_inner, n,
                           out + (a * out_outer + b * out_inner) * kBlock, out_outer,
                           out_inner);
}

// dot_tile over a whole (na x nb) output: TA rows at a time, then one at a time.
template <int level>
DCLS_MM_INLINE void dots(const float* x, int64_t x_outer, int64_t x_inner, const float* y,
                         int64_t y_outer, int64_t y_inner, int64_t n, int64_t na, int64_t nb,
                         float* out, int64_t out_outer, int64_t out_inner) {
  constexpr int TA = kTileA<level>;
  int64_t a = 0;
  for (; a + TA <= na; a += TA)
    dot_rows<level, TA>(x, x_outer, x_inner, y, y_outer, y_inner, n, a, nb, out, out_outer,
                        out_inner);
  for (; a < na; ++a)
    dot_rows<level, 1>(x, x_outer, x_inner, y, y_outer, y_inner, n, a, nb, out, out_outer,
                       out_inner);
}

// out[i][j][c] = sum_k (scale[k][c] a0[k][r0 + i][c]) a1[k][c0 + j][c]; out is
// [nr][nc][B]; sa0 is scratch for the scaled rows ([K][nr][B]).
template <int level>
DCLS_MM_INLINE void contract_impl(const float* __restrict a0, const float* __restrict a1,
                                  const float* __restrict scale, int64_t K, int64_t L0,
                                  int64_t L1, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                                  float* __restrict sa0, float* __restrict out) {
  constexpr int64_t B = kBlock;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < nr; ++i)
#pragma omp simd
      for (int64_t c = 0; c < B; ++c)
        sa0[(k * nr + i) * B + c] = scale[k * B + c] * a0[(k * L0 + r0 + i) * B + c];
  // x = sa0 rows (outer i, inner k), y = a1 columns (outer j, inner k)
  dots<level>(sa0, 1, nr, a1 + c0 * B, 1, L1, K, nr, nc, out, nc, 1);
}
DCLS_MM_ISA_LEVEL_VARIANTS(contract,
                           (const float* __restrict a0, const float* __restrict a1,
                            const float* __restrict scale, int64_t K, int64_t L0, int64_t L1,
                            int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                            float* __restrict sa0, float* __restrict out),
                           (a0, a1, scale, K, L0, L1, r0, nr, c0, nc, sa0, out))

// Backward of the contraction for one block, g is the window's [nr][nc][B]:
//   m0[k][r0 + i] = sum_j g[i][j] a1[k][c0 + j],  m1[k][c0 + j] = sum_i g[i][j] a0[k][r0 + i],
//   zero outside the window;  dscale[k] = sum_i a0[k][i] m0[k][i]
template <int level>
DCLS_MM_INLINE void contract_backward_impl(const float* __restrict g,
                                           const float* __restrict a0,
                                           const float* __restrict a1, int64_t K, int64_t L0,
                                           int64_t L1, int64_t r0, int64_t nr, int64_t c0,
                                           int64_t nc, float* __restrict m0,
                                           float* __restrict m1, float* __restrict dscale) {
  constexpr int64_t B = kBlock;
  std::fill_n(m0, K * L0 * B, 0.0f);
  std::fill_n(m1, K * L1 * B, 0.0f);
  // m0: x = a1 (outer k, inner j), y = g (outer i, inner j), out [k][i] rows of L0
  dots<level>(a1 + c0 * B, L1, 1, g, nc, 1, nc, K, nr, m0 + r0 * B, L0, 1);
  // m1: x = a0 (outer k, inner i), y = g (outer j, inner i), out [k][j] rows of L1
  dots<level>(a0 + r0 * B, L0, 1, g, 1, nc, nr, K, nc, m1 + c0 * B, L1, 1);
  for (int64_t k = 0; k < K; ++k) {
    const float* x = a0 + (k * L0 + r0) * B;
    const float* m0k = m0 + (k * L0 + r0) * B;
    float ds[B] = {};
    for (int64_t r = 0; r < nr; ++r)
#pragma omp simd
      for (int64_t c = 0; c < B; ++c) ds[c] += x[r * B + c] * m0k[r * B + c];
    std::copy_n(ds, B, dscale + k * B);
  }
}
DCLS_MM_ISA_LEVEL_VARIANTS(contract_backward,
                           (const float* __restrict g, const float* __restrict a0,
                            const float* __restrict a1, int64_t K, int64_t L0, int64_t L1,
                            int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                            float* __restrict m0, float* __restrict m1,
                            float* __restrict dscale),
                           (g, a0, a1, K, L0, L1, r0, nr, c0, nc, m0, m1, dscale))

void check_inputs(const at::Tensor& weight, const at::Tensor& P, const at::Tensor& SIG,
                  int64_t L0, int64_t L1, int64_t interp, int64_t r0, int64_t nr, int64_t c0,
                  int64_t nc) {
  const char* name = "dcls_mm::separable_kernel";
  TORCH_CHECK(weight.device().is_cpu() && P.device().is_cpu() && SIG.device().is_cpu(),
              name, ": tensors must be on the CPU");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && P.scalar_type() == at::kFloat &&
                  SIG.scalar_type() == at::kFloat,
              name, ": float32 tensors expected");
  TORCH_CHECK(weight.dim() == 2 && P.dim() == 3 && P.size(0) == 2 &&
                  P.size(1) == weight.size(0) && P.size(2) == weight.size(1) &&
                  SIG.sizes() == P.sizes(),
              name, ": weight must be (B, K) and P, SIG (2, B, K), got ", weight.sizes(),
              ", ", P.sizes(), ", ", SIG.sizes());
  TORCH_CHECK(L0 > 0 && L1 > 0, name, ": kernel sizes must be positive");
  TORCH_CHECK(r0 >= 0 && nr > 0 && r0 + nr <= L0 && c0 >= 0 && nc > 0 && c0 + nc <= L1, name,
              ": the window rows [", r0, ", ", r0 + nr, ") x columns [", c0, ", ", c0 + nc,
              ") must lie inside the ", L0, "x", L1, " kernel");
  TORCH_CHECK(interp == kTriangle || interp == kGaussian, name,
              ": interpolation must be 0 (triangle) or 1 (gaussian)");
}

// Positions on the grid and widths of one block, as kernel.py computes them in float32;
// the profiles `a` are evaluated unless `evaluated` (kept by the forward).
void load_geometry(const Shape& s, const float* w, const float* P, const float* SIG,
                   int64_t b0, int64_t nb, Scratch& t, const Profiles& a, bool evaluated) {
  const float offset = s.interp == kGaussian ? 0.27f : 1.0f;
  const int64_t plane = s.nb * s.K;
  rows_to_block16(w + b0 * s.K, nb, s.K, t.w.data());
  rows_to_block16(P + b0 * s.K, nb, s.K, t.pos0.data());
  rows_to_block16(P + plane + b0 * s.K, nb, s.K, t.pos1.data());
  rows_to_block16(SIG + b0 * s.K, nb, s.K, t.wid0.data());
  rows_to_block16(SIG + plane + b0 * s.K, nb, s.K, t.wid1.data());
  const float half0 = static_cast<float>(s.L0 / 2), half1 = static_cast<float>(s.L1 / 2);
  for (int64_t e = 0; e < s.K * kBlock; ++e) {
    t.pos0[e] += half0;
    t.pos1[e] += half1;
    t.wid0[e] = std::fabs(t.wid0[e]) + offset;
    t.wid1[e] = std::fabs(t.wid1[e]) + offset;
  }
  if (!evaluated) {
    profiles(t.pos0.data(), t.wid0.data(), s.K, s.L0, s.interp, a.a0, a.s0);
    profiles(t.pos1.data(), t.wid1.data(), s.K, s.L1, s.interp, a.a1, a.s1);
  }
  for (int64_t e = 0; e < s.K * kBlock; ++e)
    t.scale[e] = t.w[e] / (a.s0[e] * a.s1[e] + kNormEps);
}

// Gaussian taps below cut[c] are set to 0 (kernel.py, GAUSSIAN_CUT):
//   cut = max(kGaussianCut * sum_k |scale[k]| max_i a0[k][i] max_j a1[k][j], FLT_MIN)
// A gaussian profile falls off on both sides of its centre, so its largest value is the
// one at the grid point nearest to the centre (clamped to the grid): read, not searched.
// The grid point nearest to x, clamped to [0, L): clamped first (also a NaN: to 0), then
// rounded by the 1.5 * 2^23 trick (std::lround, a library call, took a third of this
// loop). It rounds halves to even, lround away from zero: the two grid points are then
// equally far from x and their profile values equal.
int64_t nearest_tap(float x, int64_t L) {
  const float last = static_cast<float>(L - 1);
  x = x > 0.0f ? x : 0.0f;
  x = x < last ? x : last;
  return static_cast<int64_t>((x + 12582912.0f) - 12582912.0f);
}

void gaussian_cut(const Shape& s, const Profiles& a, const Scratch& t, float* cut) {
  float bound[kBlock] = {};
  for (int64_t k = 0; k < s.K; ++k) {
    for (int64_t c = 0; c < kBlock; ++c) {
      const int64_t e = k * kBlock + c;
      const int64_t i = nearest_tap(t.pos0[e], s.L0), j = nearest_tap(t.pos1[e], s.L1);
      bound[c] += std::fabs(t.scale[e]) * a.a0[(k * s.L0 + i) * kBlock + c] *
                  a.a1[(k * s.L1 + j) * kBlock + c];
    }
  }
  for (int64_t c = 0; c < kBlock; ++c)
    cut[c] = std::max(bound[c] * kGaussianCut, std::numeric_limits<float>::min());
}

std::tuple<at::Tensor, at::Tensor> separable_kernel(
    const at::Tensor& weight, const at::Tensor& P, const at::Tensor& SIG, int64_t L0,
    int64_t L1, int64_t interp, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
    bool keep_profiles) {
  check_inputs(weight, P, SIG, L0, L1, interp, r0, nr, c0, nc);
  const at::Tensor wc = weight.contiguous(), pc = P.contiguous(), sc = SIG.contiguous();
  const Shape s{weight.size(0), weight.size(1), L0, L1, interp};
  const int64_t blocks = (s.nb + kBlock - 1) / kBlock;
  at::Tensor out = at::empty({s.nb, nr, nc}, weight.options());
  at::Tensor kept = at::empty({keep_profiles ? blocks : 0, profile_floats(s)}, weight.options());
  const float* wp = wc.const_data_ptr<float>();
  const float* pp = pc.const_data_ptr<float>();
  const float* sp = sc.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  float* kp = kept.mutable_data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    Scratch t(s, !keep_profiles);
    Floats kern(nr * nc * kBlock), sa0(s.K * nr * kBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b0 = blk * kBlock, nb = std::min(kBlock, s.nb - b0);
      const Profiles a =
          profiles_at(keep_profiles ? kp + blk * profile_floats(s) : t.own.data(), s);
      load_geometry(s, wp, pp, sp, b0, nb, t, a, false);
      contract(a.a0, a.a1, t.scale.data(), s.K, L0, L1, r0, nr, c0, nc, sa0.data(),
               kern.data());
      if (interp == kGaussian) {
        float cut[kBlock];
        gaussian_cut(s, a, t, cut);
        // in the block layout, lanes = channels: branch-free and vectorised (applied per
        // element in the transposing loop below, the branch on irregular cut patterns
        // mispredicted often enough to take most of the loop's time)
        for (int64_t e = 0; e < nr * nc; ++e) {
          float* v = kern.data() + e * kBlock;
#pragma omp simd
          for (int64_t c = 0; c < kBlock; ++c) v[c] = std::fabs(v[c]) < cut[c] ? 0.0f : v[c];
        }
      }
      transpose_matrix(kern.data(), kBlock, nr * nc, nb, op + b0 * nr * nc, nr * nc);
    }
  });
  return {out, kept};
}

// scale = w / (S0 S1 + eps): gradient wrt w (dw) and the profile sums; turns m_d (the
// gradient wrt scale * profile) into the profiles' own gradient, scale * m_d + dS_d
// (S_d sums the profile, so dS_d reaches every tap).
DCLS_MM_INLINE void normalisation_backward_impl(int64_t K, int64_t L0, int64_t L1,
                                                const float* __restrict s0,
                                                const float* __restrict s1,
                                                const float* __restrict w,
                                                const float* __restrict scale,
                                                const float* __restrict dscale,
                                                float* __restrict dw, float* __restrict m0,
                                                float* __restrict m1) {
  constexpr int64_t B = kBlock;
  for (int64_t k = 0; k < K; ++k) {
    float sc[B], d0[B], d1[B];
#pragma omp simd
    for (int64_t c = 0; c < B; ++c) {
      const int64_t e = k * B + c;
      const float den = s0[e] * s1[e] + kNormEps;
      dw[e] = dscale[e] / den;
      const float dz = -dscale[e] * w[e] / (den * den);
      d0[c] = dz * s1[e];
      d1[c] = dz * s0[e];
      sc[c] = scale[e];
    }
    for (int64_t i = 0; i < L0; ++i) {
      float* v = m0 + (k * L0 + i) * B;
#pragma omp simd
      for (int64_t c = 0; c < B; ++c) v[c] = sc[c] * v[c] + d0[c];
    }
    for (int64_t j = 0; j < L1; ++j) {
      float* v = m1 + (k * L1 + j) * B;
#pragma omp simd
      for (int64_t c = 0; c < B; ++c) v[c] = sc[c] * v[c] + d1[c];
    }
  }
}
DCLS_MM_ISA_VARIANTS(normalisation_backward,
                     (int64_t K, int64_t L0, int64_t L1, const float* __restrict s0,
                      const float* __restrict s1, const float* __restrict w,
                      const float* __restrict scale, const float* __restrict dscale,
                      float* __restrict dw, float* __restrict m0, float* __restrict m1),
                     (K, L0, L1, s0, s1, w, scale, dscale, dw, m0, m1))

// Gradient wrt position and raw SIG of one learned dim, from the gradient `da` wrt its
// profile a ([K][L][B]); writes dpos/dsig ([K][B]).
// gp += sum_i da[i] d a[i] / dpos, gw += sum_i da[i] d a[i] / dw for one element's
// profile a and its gradient da ([L][B]), lane by lane.
template <int level, int interp>
DCLS_MM_INLINE void profile_grad_sums(
    const float* __restrict a, const float* __restrict da, int64_t L,
    const typename dcls_mm_isa::Block16<level>::V (&p)[dcls_mm_isa::Block16<level>::P],
    const typename dcls_mm_isa::Block16<level>::V (&inv)[dcls_mm_isa::Block16<level>::P],
    typename dcls_mm_isa::Block16<level>::V (&gp)[dcls_mm_isa::Block16<level>::P],
    typename dcls_mm_isa::Block16<level>::V (&gw)[dcls_mm_isa::Block16<level>::P]) {
  using B = dcls_mm_isa::Block16<level>;
  using V = typename B::V;
  for (int64_t i = 0; i < L; ++i) {
    V ai[B::P], gi[B::P];
    dcls_mm_isa::load16<level>(ai, a + i * kBlock);
    dcls_mm_isa::load16<level>(gi, da + i * kBlock);
#pragma GCC unroll 4
    for (int q = 0; q < B::P; ++q) {
      const V u = static_cast<float>(i) - p[q];
      if constexpr (interp == kGaussian) {
        // a = exp(-t^2 / 2), t = u / w: da/dpos = a t / w, da/dw = a t u / w^2
        const V t = u * inv[q], g = gi[q] * ai[q] * t * inv[q];
        gp[q] += g;
        gw[q] += g * u * inv[q];
      } else {
        // a = relu(w - |u|): da/dpos = sign(u), da/dw = 1 where a > 0
        const V g = ai[q] > 0.0f ? gi[q] : V{};
        gp[q] += u > 0.0f ? g : (u < 0.0f ? -g : V{});
        gw[q] += g;
      }
    }
  }
}

template <int level>
DCLS_MM_INLINE void profile_backward_impl(int64_t K, int64_t L, int64_t interp,
                                          const float* __restrict pos,
                                          const float* __restrict wid,
                                          const float* __restrict a,
                                          const float* __restrict da,
                                          const float* __restrict sig_raw,
                                          float* __restrict dpos, float* __restrict dsig) {
  using B = dcls_mm_isa::Block16<level>;
  using V = typename B::V;
  for (int64_t k = 0; k < K; ++k) {
    V p[B::P], w[B::P], inv[B::P], gp[B::P] = {}, gw[B::P] = {};
    dcls_mm_isa::load16<level>(p, pos + k * kBlock);
    dcls_mm_isa::load16<level>(w, wid + k * kBlock);
#pragma GCC unroll 4
    for (int q = 0; q < B::P; ++q) inv[q] = (V{} + 1.0f) / w[q];
    const float* ak = a + k * L * kBlock;
    const float* gk = da + k * L * kBlock;
    if (interp == kGaussian) profile_grad_sums<level, kGaussian>(ak, gk, L, p, inv, gp, gw);
    else profile_grad_sums<level, kTriangle>(ak, gk, L, p, inv, gp, gw);
    V sr[B::P], ds[B::P];
    dcls_mm_isa::load16<level>(sr, sig_raw + k * kBlock);
    // d|SIG|/dSIG = sign(SIG) (0 at 0, as torch.abs)
#pragma GCC unroll 4
    for (int q = 0; q < B::P; ++q) ds[q] = sr[q] > 0.0f ? gw[q] : (sr[q] < 0.0f ? -gw[q] : V{});
    dcls_mm_isa::store16<level>(dpos + k * kBlock, gp);
    dcls_mm_isa::store16<level>(dsig + k * kBlock, ds);
  }
}
DCLS_MM_ISA_LEVEL_VARIANTS(profile_backward,
                           (int64_t K, int64_t L, int64_t interp, const float* __restrict pos,
                            const float* __restrict wid, const float* __restrict a,
                            const float* __restrict da, const float* __restrict sig_raw,
                            float* __restrict dpos, float* __restrict dsig),
                           (K, L, interp, pos, wid, a, da, sig_raw, dpos, dsig))

// g[e] = 0 where kernel[e] == 0 (a gaussian tap below the cut passes no gradient).
DCLS_MM_INLINE void zero_where_zero_impl(const float* __restrict kernel, int64_t n,
                                         float* __restrict g) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) g[e] = kernel[e] == 0.0f ? 0.0f : g[e];
}
DCLS_MM_ISA_VARIANTS(zero_where_zero, (const float* __restrict kernel, int64_t n,
                                       float* __restrict g), (kernel, n, g))

// `kept`: the profiles the forward kept (keep_profiles), or an empty tensor to evaluate
// them again. `out`: the forward's kernel, or an empty tensor; where it is 0 the gradient
// is taken as 0 (gaussian: a cut tap passes no gradient, and every tap below the cut is
// 0 while none above it is), read in the same pass that loads the gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> separable_kernel_backward(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& P,
    const at::Tensor& SIG, const at::Tensor& kept, int64_t L0, int64_t L1, int64_t interp,
    int64_t r0, int64_t nr, int64_t c0, int64_t nc, const at::Tensor& out) {
  check_inputs(weight, P, SIG, L0, L1, interp, r0, nr, c0, nc);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.device().is_cpu() && grad.dim() == 3 &&
                  grad.size(0) == weight.size(0) && grad.size(1) == nr && grad.size(2) == nc,
              "dcls_mm::separable_kernel_backward: grad must be float32 (B, nr, nc) for the "
              "window, got ", grad.sizes());
  const bool masked = out.numel() > 0;
  TORCH_CHECK(!masked || (out.scalar_type() == at::kFloat && out.device().is_cpu() &&
                          out.sizes() == grad.sizes()),
              "dcls_mm::separable_kernel_backward: out must be the forward's float32 kernel ",
              grad.sizes(), " or empty, got ", out.sizes());
  const at::Tensor gc = grad.contiguous(), wc = weight.contiguous(), pc = P.contiguous(),
                   sc = SIG.contiguous(), oc = out.contiguous();
  const Shape s{weight.size(0), weight.size(1), L0, L1, interp};
  const int64_t K = s.K, plane = s.nb * K, blocks = (s.nb + kBlock - 1) / kBlock;
  const bool have = kept.numel() > 0;
  TORCH_CHECK(!have || (kept.scalar_type() == at::kFloat && kept.device().is_cpu() &&
                        kept.is_contiguous() && kept.dim() == 2 && kept.size(0) == blocks &&
                        kept.size(1) == profile_floats(s)),
              "dcls_mm::separable_kernel_backward: the kept profiles must be what "
              "separable_kernel returned for these inputs (float32 (", blocks, ", ",
              profile_floats(s), ")), got ", kept.sizes());
  at::Tensor dw = at::empty_like(wc), dP = at::empty_like(pc), dSIG = at::empty_like(sc);
  const float* gp = gc.const_data_ptr<float>();
  const float* op = masked ? oc.const_data_ptr<float>() : nullptr;
  const float* wp = wc.const_data_ptr<float>();
  const float* pp = pc.const_data_ptr<float>();
  const float* sp = sc.const_data_ptr<float>();
  float* dwp = dw.mutable_data_ptr<float>();
  float* dpp = dP.mutable_data_ptr<float>();
  float* dsp = dSIG.mutable_data_ptr<float>();
  // read only: the backward writes its profile gradients into m0/m1
  float* kp = have ? const_cast<float*>(kept.const_data_ptr<float>()) : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    Scratch t(s, !have);
    Floats g(nr * nc * kBlock), kern(masked ? nr * nc * kBlock : 0),
        m0(K * L0 * kBlock), m1(K * L1 * kBlock),
        dscale(K * kBlock), sig0(K * kBlock), sig1(K * kBlock), out(6 * K * kBlock);
    float *dp0 = out.data(), *dp1 = dp0 + K * kBlock, *ds0 = dp1 + K * kBlock,
          *ds1 = ds0 + K * kBlock, *dwb = ds1 + K * kBlock;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b0 = blk * kBlock, nb = std::min(kBlock, s.nb - b0);
      const Profiles a =
          profiles_at(have ? kp + blk * profile_floats(s) : t.own.data(), s);
      load_geometry(s, wp, pp, sp, b0, nb, t, a, have);
      rows_to_block16(sp + b0 * K, nb, K, sig0.data());
      rows_to_block16(sp + plane + b0 * K, nb, K, sig1.data());
      rows_to_block16(gp + b0 * nr * nc, nb, nr * nc, g.data());
      if (masked) {
        rows_to_block16(op + b0 * nr * nc, nb, nr * nc, kern.data());
        zero_where_zero(kern.data(), nr * nc * kBlock, g.data());
      }
      contract_backward(g.data(), a.a0, a.a1, K, L0, L1, r0, nr, c0, nc, m0.data(),
                        m1.data(), dscale.data());
      normalisation_backward(K, L0, L1, a.s0, a.s1, t.w.data(), t.scale.data(),
                             dscale.data(), dwb, m0.data(), m1.data());
      profile_backward(K, L0, s.interp, t.pos0.data(), t.wid0.data(), a.a0, m0.data(),
                       sig0.data(), dp0, ds0);
      profile_backward(K, L1, s.interp, t.pos1.data(), t.wid1.data(), a.a1, m1.data(),
                       sig1.data(), dp1, ds1);
      for (int64_t c = 0; c < nb; ++c) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t src = k * kBlock + c, dst = (b0 + c) * K + k;
          dwp[dst] = dwb[src];
          dpp[dst] = dp0[src];
          dpp[plane + dst] = dp1[src];
          dsp[dst] = ds0[src];
          dsp[plane + dst] = ds1[src];
        }
      }
    }
  });
  return {dw, dP, dSIG};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcls_mm, m) {
  m.def("separable_kernel(Tensor weight, Tensor P, Tensor SIG, int L0, int L1, int interp, "
        "int r0, int nr, int c0, int nc, bool keep_profiles=False) -> (Tensor, Tensor)");
  m.def("separable_kernel_backward(Tensor grad, Tensor weight, Tensor P, Tensor SIG, "
        "Tensor kept, int L0, int L1, int interp, int r0, int nr, int c0, int nc, "
        "Tensor out) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dcls_mm, CPU, m) {
  m.impl("separable_kernel", &separable_kernel);
  m.impl("separable_kernel_backward", &separable_kernel_backward);
}
