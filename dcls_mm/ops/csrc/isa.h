// One copy of each hot loop per x86-64 instruction-set level, chosen at run time.
//
// The library is built once (e.g. in a Docker image) and may run on an older CPU than
// the one that compiled it, and a benchmark may want to emulate an older CPU on a newer
// one. The hot loops are written once as always_inline functions; DCLS_MM_ISA_VARIANTS
// compiles a copy for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline,
// and `dcls_mm::set_cpu_isa` picks the copy that matches ATen's CPU capability (so
// ATEN_CPU_CAPABILITY=avx2 also switches these kernels to their AVX2 copy), never one
// the running CPU does not support.
#pragma once

#include <atomic>
#include <cstring>
#include <string>

namespace dcls_mm_isa {

enum Level : int { kBaseline = 0, kV3 = 1, kV4 = 2 };

inline int supported_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return kV4;
  if (__builtin_cpu_supports("x86-64-v3")) return kV3;
#endif
  return kBaseline;
}

inline std::atomic<int>& current_level() {
  static std::atomic<int> level{supported_level()};
  return level;
}

inline int level() { return current_level().load(std::memory_order_relaxed); }

inline const char* level_name(int lvl) {
  switch (lvl) {
    case kV4: return "x86-64-v4";
    case kV3: return "x86-64-v3";
    default: return "baseline";
  }
}

// capability: what torch.backends.cpu.get_cpu_capability() returns ("AVX512", "AVX2",
// "DEFAULT", "VSX", ...). Returns the name of the copy now in use.
inline std::string set_level_for_capability(const std::string& capability) {
  int want = kBaseline;
  if (capability == "AVX512") want = kV4;
  else if (capability == "AVX2") want = kV3;
  const int lvl = want < supported_level() ? want : supported_level();
  current_level().store(lvl, std::memory_order_relaxed);
  return level_name(lvl);
}

}  // namespace dcls_mm_isa

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DCLS_MM_INLINE inline __attribute__((always_inline))
// Defines `name(params)` dispatching to three copies, `impl_v4 args` compiled for
// x86-64-v4, `impl_v3 args` for x86-64-v3 and `impl_v1 args` for the baseline.
#define DCLS_MM_ISA_COPIES(name, params, args, impl_v4, impl_v3, impl_v1)                 \
  __attribute__((target("arch=x86-64-v4"))) void name##_v4 params { impl_v4 args; }       \
  __attribute__((target("arch=x86-64-v3"))) void name##_v3 params { impl_v3 args; }       \
  void name##_v1 params { impl_v1 args; }                                                 \
  void name params {                                                                      \
    switch (dcls_mm_isa::level()) {                                                       \
      case dcls_mm_isa::kV4: name##_v4 args; break;                                       \
      case dcls_mm_isa::kV3: name##_v3 args; break;                                       \
      default: name##_v1 args;                                                            \
    }                                                                                     \
  }
// Three copies of the same `name##_impl(args)`.
#define DCLS_MM_ISA_VARIANTS(name, params, args) \
  DCLS_MM_ISA_COPIES(name, params, args, name##_impl, name##_impl, name##_impl)
// Three copies of `name##_impl<level>(args)`, for loops whose tile sizes depend on the
// register file of the level (see kSumRegisters).
#define DCLS_MM_ISA_LEVEL_VARIANTS(name, params, args)                                  \
  DCLS_MM_ISA_COPIES(name, params, args, name##_impl<dcls_mm_isa::kV4>,                 \
                     name##_impl<dcls_mm_isa::kV3>, name##_impl<dcls_mm_isa::kBaseline>)
#else
#define DCLS_MM_INLINE inline
#define DCLS_MM_ISA_VARIANTS(name, params, args) \
  void name params { name##_impl args; }
#define DCLS_MM_ISA_LEVEL_VARIANTS(name, params, args) \
  void name params { name##_impl<dcls_mm_isa::kBaseline> args; }
#endif

namespace dcls_mm_isa {

// The level's native float vector, a GCC/Clang vector type: 16 floats with AVX-512, 8
// with AVX2, 4 with SSE2 (a wider type than the level has is split by GCC through
// general registers and the stack). GCC kept running sums declared as float arrays on the
// stack, a store and a reload around every multiply-add (a ~5-cycle chain each); sums of
// these types stay in registers.
template <int level>
struct Simd {
  typedef float V __attribute__((vector_size(16)));
};
template <>
struct Simd<kV3> {
  typedef float V __attribute__((vector_size(32)));
};
template <>
struct Simd<kV4> {
  typedef float V __attribute__((vector_size(64)));
};

template <typename V>
DCLS_MM_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
DCLS_MM_INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// A block of 16 floats (16 channels) as P vectors of the level's width.
template <int level>
struct Block16 {
  using V = typename Simd<level>::V;
  static constexpr int kWidth = sizeof(V) / sizeof(float);
  static constexpr int P = 16 / kWidth;
};

// v = the 16 floats at ptr, as Block16<level>::P vectors
template <int level>
DCLS_MM_INLINE void load16(typename Block16<level>::V (&v)[Block16<level>::P],
                           const float* ptr) {
  using B = Block16<level>;
#pragma GCC unroll 4
  for (int p = 0; p < B::P; ++p) v[p] = load<typename B::V>(ptr + p * B::kWidth);
}

template <int level>
DCLS_MM_INLINE void store16(float* ptr,
                            const typename Block16<level>::V (&v)[Block16<level>::P]) {
  using B = Block16<level>;
#pragma GCC unroll 4
  for (int p = 0; p < B::P; ++p) store<typename B::V>(ptr + p * B::kWidth, v[p]);
}

// sum += a * (the 16 floats at ptr), lane by lane
template <int level>
DCLS_MM_INLINE void fma16(typename Block16<level>::V (&sum)[Block16<level>::P],
                          const typename Block16<level>::V (&a)[Block16<level>::P],
                          const float* ptr) {
  using B = Block16<level>;
#pragma GCC unroll 4
  for (int p = 0; p < B::P; ++p) sum[p] += a[p] * load<typename B::V>(ptr + p * B::kWidth);
}

// How many running sums of 16 floats a tiled loop keeps in registers at each level (one
// zmm, two ymm or four xmm each): 8 of 32 zmm; 6 sums = 12 of 16 ymm (with 4, the AVX2
// copy's forward was 2-30% slower in 9 of 9 ConvNeXt-shape pairs, its kernel gradient
// the same within noise); 2 sums = 8 of 16 xmm.
template <int level>
constexpr int kSumRegisters = level == kV4 ? 8 : (level == kV3 ? 6 : 2);

}  // namespace dcls_mm_isa
