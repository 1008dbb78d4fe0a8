// The taps of a 2-D DCLS kernel whose gradient the construction's backward reads
// (dcls_mm.ops.kernel.gradient_support documents the rule): the union over a channel's
// elements of one rectangle each, over a window of the kernel. A superset is always
// correct (the kernel gradient is then computed on a few taps more), a subset never.
//
// In PyTorch ops this took 3 ms per ConvNeXt layer of 768 channels (prefix sums over a
// difference array), more than the sparse kernel gradient saves there; here each
// element marks its rectangle directly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

// floor and ceil of a finite double by conversion, without a branch: the baseline
// x86-64 build has no rounding instruction (std::floor is a libm call), and a branch on
// the sign of the fraction is mispredicted half the time for trained positions
inline double floor_(double v) {
  const double t = static_cast<double>(static_cast<int64_t>(v));
  return t - static_cast<double>(t > v);
}
inline double ceil_(double v) { return -floor_(-v); }

// [low, high] along one dim of an element, in window coordinates (empty if low > high).
struct Range {
  int64_t low, high;
};

// bilinear: the taps floor(p) and floor(p) + 1 of the position clamped to [-1, L] (grid
// index p + L // 2), computed both ways the constructions round it (floor(p) + L // 2 in
// the position's precision, floor(p + L // 2) in float32);
// triangle: |i - p| <= w + 1e-3, w = |sig| + offset.
Range range(float p, const float* sig, float offset, int64_t L, int64_t start, int64_t stop) {
  const int64_t half = L / 2;
  double low, high;
  if (sig) {
    const double pos = static_cast<double>(p) + half;
    const double reach = std::fabs(static_cast<double>(*sig)) + offset + 1e-3;
    // clamped to the window (and one past it) before the conversion to an integer,
    // which a diverged position or width (1e20) would overflow
    const double lo = static_cast<double>(start - 1), hi = static_cast<double>(stop);
    low = ceil_(std::min(std::max(pos - reach, lo), hi));
    high = floor_(std::min(std::max(pos + reach, lo), hi));
  } else {
    const float clamped = std::min(std::max(p, static_cast<float>(-1 - half)),
                                   static_cast<float>(L - half));
    const double a = floor_(static_cast<double>(clamped)) + half;
    const double b = floor_(clamped + static_cast<float>(half));
    low = std::min(a, b);
    high = std::max(a, b) + 1;
  }
  low = std::max(low, static_cast<double>(start));
  high = std::min(high, static_cast<double>(stop - 1));
  return Range{static_cast<int64_t>(low) - start, static_cast<int64_t>(high) - start};
}

at::Tensor gradient_support(const at::Tensor& P, const c10::optional<at::Tensor>& SIG,
                            double offset, int64_t L0, int64_t L1, int64_t r0, int64_t nr,
                            int64_t c0, int64_t nc) {
  const char* name = "dcls_mm::gradient_support";
  TORCH_CHECK(P.device().is_cpu() && P.scalar_type() == at::kFloat && P.dim() == 3 &&
                  P.size(0) == 2,
              name, ": P must be a float32 CPU tensor (2, B, K), got ", P.sizes());
  const bool triangle = SIG.has_value() && SIG->defined();
  at::Tensor sig;
  if (triangle) {
    TORCH_CHECK(SIG->scalar_type() == at::kFloat && SIG->sizes() == P.sizes(), name,
                ": SIG must be float32 like P, got ", SIG->sizes());
    sig = SIG->contiguous();
  }
  TORCH_CHECK(0 <= r0 && 0 < nr && r0 + nr <= L0 && 0 <= c0 && 0 < nc && c0 + nc <= L1, name,
              ": the window must lie inside the ", L0, "x", L1, " kernel");
  const at::Tensor pos = P.contiguous();
  const int64_t B = P.size(1), K = P.size(2);
  at::Tensor out = at::zeros({B, nr, nc}, P.options().dtype(at::kBool));
  const float* pp = pos.const_data_ptr<float>();
  const float* sp = triangle ? sig.const_data_ptr<float>() : nullptr;
  bool* op = out.mutable_data_ptr<bool>();
  const float off = static_cast<float>(offset);
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      bool* mask = op + b * nr * nc;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e0 = b * K + k, e1 = (B + b) * K + k;
        const float p0 = pp[e0], p1 = pp[e1];
        if (!std::isfinite(p0) || !std::isfinite(p1) ||
            (triangle && (!std::isfinite(sp[e0]) || !std::isfinite(sp[e1])))) {
          std::fill(mask, mask + nr * nc, true);  // no rule: every tap (the construction
          break;                                   // reports non-finite positions)
        }
        const Range rows = range(p0, triangle ? sp + e0 : nullptr, off, L0, r0, r0 + nr);
        const Range cols = range(p1, triangle ? sp + e1 : nullptr, off, L1, c0, c0 + nc);
        for (int64_t i = rows.low; i <= rows.high; ++i)
          for (int64_t j = cols.low; j <= cols.high; ++j) mask[i * nc + j] = true;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcls_mm, m) {
  m.def("gradient_support(Tensor P, Tensor? SIG, float offset, int L0, int L1, int r0, int nr, "
        "int c0, int nc) -> Tensor");
}

TORCH_LIBRARY_IMPL(dcls_mm, CPU, m) { m.impl("gradient_support", &gradient_support); }
