// Bilinear DCLS kernel construction (2 learned dims) on the CPU, forward and backward.
//
// Element k of pair b (every (C_out, C_in/g) pair) is the weight w[b, k] at position
// P[:, b, k]; along dim d the position is clamped to [-1 - L_d / 2, L_d - L_d / 2] and
// split into its floor (grid index i_d = floor + L_d / 2) and fraction f_d; the element
// adds (w (1 - f_0 | f_0)) (1 - f_1 | f_1) to its 4 taps (i_0 | i_0 + 1, i_1 | i_1 + 1)
// that lie on the grid. That is dcls_mm.ops.kernel._bilinear_kernel, whose scatter_add
// costs ~35 small autograd ops per layer (0.7-2.7 ms at ConvNeXt sizes, more than the
// construction's arithmetic by two orders of magnitude). The forward adds the taps in the
// order that scatter_add does (corner by corner, elements in order), so both give the
// same bits.
//
// Both ops take a window: rows [r0, r0 + nr) and columns [c0, c0 + nc) of the L0 x L1
// kernel; only those taps are built, and only their gradient reaches the backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "isa.h"

namespace {

using dcls_mm_isa::Floats;
using dcls_mm_isa::rows_to_block16;
using dcls_mm_isa::transpose_matrix;

constexpr int64_t kBlock = 16;  // pairs b per block, one per vector lane (as separable_kernel)

// Geometry of one block of kBlock pairs, [K][B] (lane = pair): per element and dim the
// grid index of its first tap, the weight of its second tap (the first gets 1 - frac),
// whether the position lies within the clamp range (else its gradient is zero), and the
// values of its 4 taps, [corner][K][B] (computed here, apart from the scatter's additions,
// so that the compiler cannot fuse a multiply into an addition: same rounding as PyTorch).
struct Block {
  Floats p0, p1, w;  // loaded
  std::vector<int32_t> i0, i1;
  Floats f0, f1, in0, in1, vals;
  explicit Block(int64_t K)
      : p0(K * kBlock), p1(K * kBlock), w(K * kBlock), i0(K * kBlock), i1(K * kBlock),
        f0(K * kBlock), f1(K * kBlock), in0(K * kBlock), in1(K * kBlock),
        vals(4 * K * kBlock) {}
};

// Loads pairs [b0, b0 + nb) (missing lanes: weight 0 at position 0); false if a position
// is NaN.
bool load_block(const float* w, const float* P, int64_t total, int64_t K, int64_t b0,
                int64_t nb, Block& t) {
  const int64_t n = K * kBlock;
  rows_to_block16(P + b0 * K, nb, K, t.p0.data());
  rows_to_block16(P + (total + b0) * K, nb, K, t.p1.data());
  rows_to_block16(w + b0 * K, nb, K, t.w.data());
  bool nan = false;
  for (int64_t o = 0; o < n; ++o) nan |= (t.p0[o] != t.p0[o]) | (t.p1[o] != t.p1[o]);
  return !nan;
}

// Clamp, floor and fraction of every coordinate, vectorised over the block (positions are
// random, so a branch per element would be mispredicted half the time).
DCLS_MM_INLINE void split_impl(const float* __restrict p, int64_t n, int64_t L,
                               int32_t* __restrict index, float* __restrict frac,
                               float* __restrict inside) {
  const float lo = static_cast<float>(-1 - L / 2), hi = static_cast<float>(L - L / 2);
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    const float q = std::min(std::max(p[e], lo), hi);
    const float base = std::floor(q);
    index[e] = static_cast<int32_t>(base) + static_cast<int32_t>(L / 2);
    frac[e] = q - base;
    inside[e] = (p[e] >= lo) & (p[e] <= hi) ? 1.0f : 0.0f;
  }
}
DCLS_MM_ISA_VARIANTS(split,
                     (const float* __restrict p, int64_t n, int64_t L,
                      int32_t* __restrict index, float* __restrict frac,
                      float* __restrict inside),
                     (p, n, L, index, frac, inside))

DCLS_MM_INLINE void tap_values_impl(const float* __restrict w, const float* __restrict f0,
                                    const float* __restrict f1, int64_t n,
                                    float* __restrict vals) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    const float a = w[e] * (1.0f - f0[e]), b = w[e] * f0[e];  // as PyTorch: (w u0) u1
    vals[e] = a * (1.0f - f1[e]);
    vals[n + e] = a * f1[e];
    vals[2 * n + e] = b * (1.0f - f1[e]);
    vals[3 * n + e] = b * f1[e];
  }
}
DCLS_MM_ISA_VARIANTS(tap_values,
                     (const float* __restrict w, const float* __restrict f0,
                      const float* __restrict f1, int64_t n, float* __restrict vals),
                     (w, f0, f1, n, vals))

void geometry(Block& t, int64_t K, int64_t L0, int64_t L1) {
  const int64_t n = K * kBlock;
  split(t.p0.data(), n, L0, t.i0.data(), t.f0.data(), t.in0.data());
  split(t.p1.data(), n, L1, t.i1.data(), t.f1.data(), t.in1.data());
}

// Window offset of tap (r, c), or `trash` (a scratch row past the window) off the window.
// Without a branch: taken at random for spread positions, its mispredictions took most
// of both ops' time.
DCLS_MM_INLINE int64_t tap(int64_t r, int64_t c, int64_t nr, int64_t nc, int64_t trash) {
  const int64_t on = (static_cast<uint64_t>(r) < static_cast<uint64_t>(nr)) &
                     (static_cast<uint64_t>(c) < static_cast<uint64_t>(nc));
  return trash + on * (r * nc + c - trash);
}

// kern [nr * nc + 1][B]: every lane adds its taps corner by corner, elements in order
// (the order of scatter_add, so the same bits); lanes never share a slot.
DCLS_MM_INLINE void scatter_impl(const int32_t* __restrict i0, const int32_t* __restrict i1,
                                 const float* __restrict vals, int64_t K, int64_t r0,
                                 int64_t nr, int64_t c0, int64_t nc, float* __restrict kern) {
  constexpr int64_t B = kBlock;
  const int64_t trash = nr * nc;
  for (int corner = 0; corner < 4; ++corner) {
    const int dr = corner >> 1, dc = corner & 1;
    for (int64_t k = 0; k < K; ++k) {
#pragma omp simd
      for (int64_t c = 0; c < B; ++c) {
        const int64_t o = k * B + c;
        const int64_t at = tap(i0[o] + dr - r0, i1[o] + dc - c0, nr, nc, trash);
        kern[at * B + c] += vals[corner * K * B + o];
      }
    }
  }
}
DCLS_MM_ISA_VARIANTS(scatter,
                     (const int32_t* __restrict i0, const int32_t* __restrict i1,
                      const float* __restrict vals, int64_t K, int64_t r0, int64_t nr,
                      int64_t c0, int64_t nc, float* __restrict kern),
                     (i0, i1, vals, K, r0, nr, c0, nc, kern))

// g [nr * nc + 1][B] (the trash row zero): gradient wrt weights and both fractions.
DCLS_MM_INLINE void gather_impl(const int32_t* __restrict i0, const int32_t* __restrict i1,
                                const float* __restrict f0, const float* __restrict f1,
                                const float* __restrict w, const float* __restrict in0,
                                const float* __restrict in1, int64_t K, int64_t r0,
                                int64_t nr, int64_t c0, int64_t nc, const float* __restrict g,
                                float* __restrict dw, float* __restrict dp0,
                                float* __restrict dp1) {
  constexpr int64_t B = kBlock;
  const int64_t trash = nr * nc;
  for (int64_t k = 0; k < K; ++k) {
#pragma omp simd
    for (int64_t c = 0; c < B; ++c) {
      const int64_t o = k * B + c, r = i0[o] - r0, q = i1[o] - c0;
      const float t00 = g[tap(r, q, nr, nc, trash) * B + c];
      const float t01 = g[tap(r, q + 1, nr, nc, trash) * B + c];
      const float t10 = g[tap(r + 1, q, nr, nc, trash) * B + c];
      const float t11 = g[tap(r + 1, q + 1, nr, nc, trash) * B + c];
      const float a1 = f0[o], a0 = 1.0f - a1, b1 = f1[o], b0 = 1.0f - b1;
      dw[o] = a0 * b0 * t00 + a0 * b1 * t01 + a1 * b0 * t10 + a1 * b1 * t11;
      const float g0 = w[o] * (b0 * (t10 - t00) + b1 * (t11 - t01));
      const float g1 = w[o] * (a0 * (t01 - t00) + a1 * (t11 - t10));
      dp0[o] = in0[o] != 0.0f ? g0 : 0.0f;
      dp1[o] = in1[o] != 0.0f ? g1 : 0.0f;
    }
  }
}
DCLS_MM_ISA_VARIANTS(gather,
                     (const int32_t* __restrict i0, const int32_t* __restrict i1,
                      const float* __restrict f0, const float* __restrict f1,
                      const float* __restrict w, const float* __restrict in0,
                      const float* __restrict in1, int64_t K, int64_t r0, int64_t nr,
                      int64_t c0, int64_t nc, const float* __restrict g, float* __restrict dw,
                      float* __restrict dp0, float* __restrict dp1),
                     (i0, i1, f0, f1, w, in0, in1, K, r0, nr, c0, nc, g, dw, dp0, dp1))

void check_inputs(const char* name, const at::Tensor& weight, const at::Tensor& P, int64_t L0,
                  int64_t L1, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  TORCH_CHECK(weight.device().is_cpu() && P.device().is_cpu(), name,
              ": tensors must be on the CPU");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && P.scalar_type() == at::kFloat, name,
              ": float32 tensors expected");
  TORCH_CHECK(weight.dim() == 2 && P.dim() == 3 && P.size(0) == 2 &&
                  P.size(1) == weight.size(0) && P.size(2) == weight.size(1),
              name, ": weight must be (B, K) and P (2, B, K), got ", weight.sizes(), ", ",
              P.sizes());
  TORCH_CHECK(L0 > 0 && L1 > 0, name, ": kernel sizes must be positive");
  TORCH_CHECK(r0 >= 0 && nr > 0 && r0 + nr <= L0 && c0 >= 0 && nc > 0 && c0 + nc <= L1, name,
              ": the window rows [", r0, ", ", r0 + nr, ") x columns [", c0, ", ", c0 + nc,
              ") must lie inside the ", L0, "x", L1, " kernel");
}

at::Tensor bilinear_kernel(const at::Tensor& weight, const at::Tensor& P, int64_t L0,
                           int64_t L1, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  const char* name = "dcls_mm::bilinear_kernel";
  check_inputs(name, weight, P, L0, L1, r0, nr, c0, nc);
  const at::Tensor wc = weight.contiguous(), pc = P.contiguous();
  const int64_t total = weight.size(0), K = weight.size(1), taps = nr * nc;
  at::Tensor out = at::empty({total, nr, nc}, weight.options());
  const float* wp = wc.const_data_ptr<float>();
  const float* pp = pc.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  std::atomic<bool> nan{false};
  at::parallel_for(0, (total + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    Block t(K);
    Floats kern((taps + 1) * kBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b0 = blk * kBlock, nb = std::min(kBlock, total - b0);
      if (!load_block(wp, pp, total, K, b0, nb, t)) nan = true;
      geometry(t, K, L0, L1);
      tap_values(t.w.data(), t.f0.data(), t.f1.data(), K * kBlock, t.vals.data());
      std::fill(kern.begin(), kern.end(), 0.0f);
      scatter(t.i0.data(), t.i1.data(), t.vals.data(), K, r0, nr, c0, nc, kern.data());
      transpose_matrix(kern.data(), kBlock, taps, nb, op + b0 * taps, taps);
    }
  });
  TORCH_CHECK(!nan, name, ": the positions P contain NaN");
  return out;
}

std::tuple<at::Tensor, at::Tensor> bilinear_kernel_backward(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& P, int64_t L0,
    int64_t L1, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  const char* name = "dcls_mm::bilinear_kernel_backward";
  check_inputs(name, weight, P, L0, L1, r0, nr, c0, nc);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.device().is_cpu() && grad.dim() == 3 &&
                  grad.size(0) == weight.size(0) && grad.size(1) == nr && grad.size(2) == nc,
              name, ": grad must be float32 (B, nr, nc) for the window, got ", grad.sizes());
  const at::Tensor gc = grad.contiguous(), wc = weight.contiguous(), pc = P.contiguous();
  const int64_t total = weight.size(0), K = weight.size(1), taps = nr * nc;
  at::Tensor dw = at::empty_like(wc), dP = at::empty_like(pc);
  const float* gp = gc.const_data_ptr<float>();
  const float* wp = wc.const_data_ptr<float>();
  const float* pp = pc.const_data_ptr<float>();
  float* dwp = dw.mutable_data_ptr<float>();
  float* dpp = dP.mutable_data_ptr<float>();
  std::atomic<bool> nan{false};
  at::parallel_for(0, (total + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    Block t(K);
    Floats g((taps + 1) * kBlock, 0.0f), out(3 * K * kBlock);
    float *gw = out.data(), *g0 = gw + K * kBlock, *g1 = g0 + K * kBlock;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b0 = blk * kBlock, nb = std::min(kBlock, total - b0);
      if (!load_block(wp, pp, total, K, b0, nb, t)) nan = true;
      geometry(t, K, L0, L1);
      rows_to_block16(gp + b0 * taps, nb, taps, g.data());  // (the trash row stays 0)
      gather(t.i0.data(), t.i1.data(), t.f0.data(), t.f1.data(), t.w.data(), t.in0.data(),
             t.in1.data(), K, r0, nr, c0, nc, g.data(), gw, g0, g1);
      transpose_matrix(gw, kBlock, K, nb, dwp + b0 * K, K);
      transpose_matrix(g0, kBlock, K, nb, dpp + b0 * K, K);
      transpose_matrix(g1, kBlock, K, nb, dpp + (total + b0) * K, K);
    }
  });
  TORCH_CHECK(!nan, name, ": the positions P contain NaN");
  return {dw, dP};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcls_mm, m) {
  m.def("bilinear_kernel(Tensor weight, Tensor P, int L0, int L1, int r0, int nr, int c0, "
        "int nc) -> Tensor");
  m.def("bilinear_kernel_backward(Tensor grad, Tensor weight, Tensor P, int L0, int L1, "
        "int r0, int nr, int c0, int nc) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dcls_mm, CPU, m) {
  m.impl("bilinear_kernel", &bilinear_kernel);
  m.impl("bilinear_kernel_backward", &bilinear_kernel_backward);
}
