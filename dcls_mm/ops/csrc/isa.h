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

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <utility>
#include <vector>

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

// Keeps a loaded vector in a register: GCC otherwise folds the load into each
// multiply-add that uses it (a memory operand), reading it again per use; unaligned, most
// of those reads span two cache lines and the loads, not the multiply-adds, bound the loop.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DCLS_MM_IN_REGISTER(x) asm("" : "+v"(x))
#else
#define DCLS_MM_IN_REGISTER(x) ((void)0)
#endif
// Hides how a pointer was computed, so that GCC cannot rewrite a running pointer as
// base + constant offsets (and keep all those offsets live in registers).
#if defined(__GNUC__)
#define DCLS_MM_OPAQUE_POINTER(p) asm("" : "+r"(p))
#else
#define DCLS_MM_OPAQUE_POINTER(p) ((void)0)
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

// Allocates on cache-line boundaries (std::allocator gives 16 bytes): vector loads and
// stores at multiples of 16 floats from the start of a buffer then never touch two cache
// lines (a split access costs about two). The sparse kernel gradient took 8-17% less
// time on ConvNeXt shapes with its planes so aligned (and their rows whole lines).
template <typename T>
struct CacheLineAllocator {
  typedef T value_type;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
// Scratch floats of the hot loops.
using Floats = std::vector<float, CacheLineAllocator<float>>;

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

// The lane of concat(a, b) that a butterfly step puts at `col` of its low (high) result:
// swapping bit `bit` of the row index with bit `bit` of the column index, for the rows a
// (that bit 0) and b (that bit 1). All steps 0..log2(L)-1 transpose L rows of L lanes.
constexpr int butterfly_lane(int bit, bool high, int col, int L) {
  return ((col >> bit) & 1) ? (high ? L + col : L + (col & ~(1 << bit)))
                            : (high ? (col | (1 << bit)) : col);
}

template <typename V, int bit, bool high, size_t... I>
DCLS_MM_INLINE V butterfly(V a, V b, std::index_sequence<I...>) {
  constexpr int L = sizeof(V) / sizeof(float);
#if defined(__clang__)
  return __builtin_shufflevector(a, b, butterfly_lane(bit, high, I, L)...);
#else
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  return __builtin_shuffle(a, b, VI{butterfly_lane(bit, high, I, L)...});
#endif
}

// rows[i][j] <-> rows[j][i] for L rows of L lanes, from bit `bit` on.
template <typename V, int bit = 0>
DCLS_MM_INLINE void transpose(V (&rows)[sizeof(V) / sizeof(float)]) {
  constexpr int L = sizeof(V) / sizeof(float);
  if constexpr ((1 << bit) < L) {
    constexpr auto lanes = std::make_index_sequence<L>{};
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) {
      if (i & (1 << bit)) continue;
      const V a = rows[i], b = rows[i | (1 << bit)];
      rows[i] = butterfly<V, bit, false>(a, b, lanes);
      rows[i | (1 << bit)] = butterfly<V, bit, true>(a, b, lanes);
    }
    transpose<V, bit + 1>(rows);
  }
}

// An L x L block: the first `loads` vectors at src, src + src_step, ... (zeros for the
// others), transposed, the first `stores` of its rows written at dst, dst + dst_step, ...
template <typename V>
DCLS_MM_INLINE void transpose_block(const float* __restrict src, int64_t src_step,
                                    int64_t loads, float* __restrict dst, int64_t dst_step,
                                    int64_t stores) {
  constexpr int L = sizeof(V) / sizeof(float);
  V block[L];
#pragma GCC unroll 16
  for (int k = 0; k < L; ++k) block[k] = k < loads ? load<V>(src + k * src_step) : V{};
  transpose<V>(block);
#pragma GCC unroll 16
  for (int k = 0; k < L; ++k)
    if (k < stores) store<V>(dst + k * dst_step, block[k]);
}

// dst[j * dst_step + i] = src[i * src_step + j] for i < rows, j < cols: whole
// lanes x lanes blocks transposed in registers (element by element, the copies between
// the channel-major tensors and the block layouts of 16 channels took a fifth of a
// construction's backward), the rest one by one. transpose_matrix (declared below,
// compiled once in depthwise_kernel_grad.cpp) picks the copy for the running level.
template <int level>
DCLS_MM_INLINE void transpose_matrix_impl(const float* __restrict src, int64_t src_step,
                                          int64_t rows, int64_t cols, float* __restrict dst,
                                          int64_t dst_step) {
  using V = typename Simd<level>::V;
  constexpr int64_t L = sizeof(V) / sizeof(float);
  const int64_t rv = rows / L * L, cv = cols / L * L;
  for (int64_t i = 0; i < rv; i += L)
    for (int64_t j = 0; j < cv; j += L)
      transpose_block<V>(src + i * src_step + j, src_step, L, dst + j * dst_step + i,
                         dst_step, L);
  // the columns past the whole blocks of the first rv rows, then every column of the rest
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = i < rv ? cv : 0; j < cols; ++j)
      dst[j * dst_step + i] = src[i * src_step + j];
}

void transpose_matrix(const float* __restrict src, int64_t src_step, int64_t rows,
                      int64_t cols, float* __restrict dst, int64_t dst_step);

// The layout of the kernels that work on 16 channels at a time: rows [0, rows) of a
// row-major (rows, length) array at src (rows <= 16) into dst[length][16], lane r holding
// row r; the lanes past rows are set to 0.
inline void rows_to_block16(const float* __restrict src, int64_t rows, int64_t length,
                            float* __restrict dst) {
  if (rows < 16) std::fill_n(dst, length * 16, 0.0f);
  transpose_matrix(src, length, rows, length, dst, 16);
}

}  // namespace dcls_mm_isa
