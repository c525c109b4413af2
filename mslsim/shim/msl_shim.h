// Enough of the Metal Shading Language, as C++20 for clang, to compile
// mx.fast.metal_kernel bodies and run them under msl_rt.cpp. It also stands
// in for the part of MLX's metal::utils() that MLX prepends to every kernel.
//
// Known gaps: simdgroup_matrix, textures, bool vectors, packed_* types, and
// static_cast between vector types (clang bit-casts them; use float4(h4)).
#pragma once
#pragma clang system_header  // allows the `h` literal suffix below

#include <cstddef>
#include <cstdint>
#include <cmath>
#include <limits>
#include <type_traits>

#include "msl_rt.h"

// ---------------------------------------------- address spaces, qualifiers
#define device
#define constant
#define thread
#define threadgroup
#define kernel
#define METAL_FUNC inline
#define MLX_MTL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")
#define MLX_MTL_CONST static constexpr const

// ---------------------------------------------------------------- scalars
typedef _Float16 half;
typedef __bf16 bfloat;
typedef half float16_t;
typedef __bf16 bfloat16_t;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

constexpr half operator""h(long double x) { return half(x); }
constexpr half operator""h(unsigned long long x) { return half(x); }

// ---------------------------------------------------------------- vectors
template <class T, int N>
using vec = T __attribute__((ext_vector_type(N)));

#define MSL_VECTORS(T, name)                                  \
  typedef T name##2 __attribute__((ext_vector_type(2)));      \
  typedef T name##3 __attribute__((ext_vector_type(3)));      \
  typedef T name##4 __attribute__((ext_vector_type(4)));
MSL_VECTORS(float, float)
MSL_VECTORS(half, half)
MSL_VECTORS(__bf16, bfloat)
MSL_VECTORS(int, int)
MSL_VECTORS(unsigned int, uint)
MSL_VECTORS(short, short)
MSL_VECTORS(unsigned short, ushort)
MSL_VECTORS(char, char)
MSL_VECTORS(unsigned char, uchar)
#undef MSL_VECTORS

namespace msl {
template <class V>
struct vec_traits {
  static constexpr int size = 0;
  using elem = V;
};
template <class T, int N>
struct vec_traits<T __attribute__((ext_vector_type(N)))> {
  static constexpr int size = N;
  using elem = T;
};
template <class V>
constexpr bool is_vec = vec_traits<std::remove_cvref_t<V>>::size > 0;
template <class V>
using elem_t = typename vec_traits<std::remove_cvref_t<V>>::elem;

template <class T, int N, class A>
inline void put(vec<T, N>& r, int& i, A a) {
  if constexpr (is_vec<A>) {
    for (int k = 0; k < vec_traits<A>::size; ++k) r[i++] = static_cast<T>(a[k]);
  } else {
    r[i++] = static_cast<T>(a);
  }
}

// MSL constructors: float4(x) splats, float4(h4) converts, float4(a, b.xy, c) concatenates.
template <class T, int N, class... A>
inline vec<T, N> make_vec(A... a) {
  vec<T, N> r = static_cast<T>(0);
  if constexpr (sizeof...(A) == 1 && !(is_vec<A> && ...)) {
    r = static_cast<T>((a, ...));
  } else {
    int i = 0;
    (put<T, N>(r, i, a), ...);
  }
  return r;
}

// Applies a scalar function to a scalar or to each element of a vector.
template <class V, class F>
inline V map(V x, F f) {
  if constexpr (is_vec<V>) {
    V r;
    for (int i = 0; i < vec_traits<V>::size; ++i) r[i] = f(x[i]);
    return r;
  } else {
    return f(x);
  }
}
template <class V, class F>
inline V map2(V x, V y, F f) {
  if constexpr (is_vec<V>) {
    V r;
    for (int i = 0; i < vec_traits<V>::size; ++i) r[i] = f(x[i], y[i]);
    return r;
  } else {
    return f(x, y);
  }
}
}  // namespace msl

// Function-like macros expand only before '(', so `float4 x;` keeps the type.
#define float2(...) ::msl::make_vec<float, 2>(__VA_ARGS__)
#define float3(...) ::msl::make_vec<float, 3>(__VA_ARGS__)
#define float4(...) ::msl::make_vec<float, 4>(__VA_ARGS__)
#define half2(...) ::msl::make_vec<half, 2>(__VA_ARGS__)
#define half3(...) ::msl::make_vec<half, 3>(__VA_ARGS__)
#define half4(...) ::msl::make_vec<half, 4>(__VA_ARGS__)
#define bfloat2(...) ::msl::make_vec<__bf16, 2>(__VA_ARGS__)
#define bfloat4(...) ::msl::make_vec<__bf16, 4>(__VA_ARGS__)
#define int2(...) ::msl::make_vec<int, 2>(__VA_ARGS__)
#define int3(...) ::msl::make_vec<int, 3>(__VA_ARGS__)
#define int4(...) ::msl::make_vec<int, 4>(__VA_ARGS__)
#define uint2(...) ::msl::make_vec<unsigned int, 2>(__VA_ARGS__)
#define uint3(...) ::msl::make_vec<unsigned int, 3>(__VA_ARGS__)
#define uint4(...) ::msl::make_vec<unsigned int, 4>(__VA_ARGS__)

// ------------------------------------------------------------ metal::

namespace metal {

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
template <>
struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr bool has_infinity = true;
  static constexpr half max() { return half(65504.0f); }
  static constexpr half min() { return half(6.103515625e-05f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half epsilon() { return half(0.0009765625f); }
  static constexpr half infinity() { return half(__builtin_inff()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <>
struct numeric_limits<__bf16> {
  static constexpr bool is_specialized = true;
  static constexpr bool has_infinity = true;
  static constexpr __bf16 max() { return __bf16(3.38953139e38f); }
  static constexpr __bf16 min() { return __bf16(1.17549435e-38f); }
  static constexpr __bf16 lowest() { return __bf16(-3.38953139e38f); }
  static constexpr __bf16 epsilon() { return __bf16(0.0078125f); }
  static constexpr __bf16 infinity() { return __bf16(__builtin_inff()); }
  static constexpr __bf16 quiet_NaN() { return __bf16(__builtin_nanf("")); }
};

enum memory_order { memory_order_relaxed, memory_order_seq_cst };

enum class mem_flags : unsigned {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }

template <class T, class U>
inline T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of the same size");
  return __builtin_bit_cast(T, x);
}

// Float math runs in float and rounds back, as Metal does for half.
#define MSL_FLOAT_FN(name, expr)                                                            \
  template <class V>                                                                        \
  inline V name(V x) {                                                                      \
    return ::msl::map(x, [](auto v) {                                                       \
      using E = decltype(v);                                                                \
      float f = static_cast<float>(v);                                                      \
      return static_cast<E>(expr);                                                          \
    });                                                                                     \
  }
MSL_FLOAT_FN(exp, std::exp(f))
MSL_FLOAT_FN(exp2, std::exp2(f))
MSL_FLOAT_FN(exp10, std::pow(10.0f, f))
MSL_FLOAT_FN(log, std::log(f))
MSL_FLOAT_FN(log2, std::log2(f))
MSL_FLOAT_FN(log10, std::log10(f))
MSL_FLOAT_FN(sqrt, std::sqrt(f))
MSL_FLOAT_FN(rsqrt, 1.0f / std::sqrt(f))
MSL_FLOAT_FN(sin, std::sin(f))
MSL_FLOAT_FN(cos, std::cos(f))
MSL_FLOAT_FN(tan, std::tan(f))
MSL_FLOAT_FN(asin, std::asin(f))
MSL_FLOAT_FN(acos, std::acos(f))
MSL_FLOAT_FN(atan, std::atan(f))
MSL_FLOAT_FN(sinh, std::sinh(f))
MSL_FLOAT_FN(cosh, std::cosh(f))
MSL_FLOAT_FN(tanh, std::tanh(f))
MSL_FLOAT_FN(floor, std::floor(f))
MSL_FLOAT_FN(ceil, std::ceil(f))
MSL_FLOAT_FN(round, std::round(f))
MSL_FLOAT_FN(rint, std::rint(f))
MSL_FLOAT_FN(trunc, std::trunc(f))
MSL_FLOAT_FN(fract, f - std::floor(f))
MSL_FLOAT_FN(fabs, std::fabs(f))
MSL_FLOAT_FN(saturate, std::fmin(std::fmax(f, 0.0f), 1.0f))
#undef MSL_FLOAT_FN

template <class V>
inline V abs(V x) {
  return ::msl::map(x, [](auto v) { return v < decltype(v)(0) ? decltype(v)(-v) : v; });
}
template <class V>
inline bool isnan(V x) { return std::isnan(static_cast<float>(x)); }
template <class V>
inline bool isinf(V x) { return std::isinf(static_cast<float>(x)); }
template <class V>
inline bool isfinite(V x) { return std::isfinite(static_cast<float>(x)); }
template <class V>
inline bool signbit(V x) { return std::signbit(static_cast<float>(x)); }

// max/min of floats return the other operand when one is NaN, like fmax.
template <class V>
inline V max(V x, V y) {
  return ::msl::map2(x, y, [](auto a, auto b) {
    using E = decltype(a);
    if constexpr (std::is_integral_v<E>) return a < b ? b : a;
    else return static_cast<E>(std::fmax(static_cast<float>(a), static_cast<float>(b)));
  });
}
template <class V>
inline V min(V x, V y) {
  return ::msl::map2(x, y, [](auto a, auto b) {
    using E = decltype(a);
    if constexpr (std::is_integral_v<E>) return b < a ? b : a;
    else return static_cast<E>(std::fmin(static_cast<float>(a), static_cast<float>(b)));
  });
}
template <class V>
inline V fmax(V x, V y) { return max(x, y); }
template <class V>
inline V fmin(V x, V y) { return min(x, y); }
template <class V>
inline V clamp(V x, V lo, V hi) { return min(max(x, lo), hi); }

#define MSL_FLOAT_FN2(name, expr)                                                      \
  template <class V>                                                                   \
  inline V name(V x, V y) {                                                            \
    return ::msl::map2(x, y, [](auto a, auto b) {                                      \
      using E = decltype(a);                                                           \
      float f = static_cast<float>(a), g = static_cast<float>(b);                      \
      return static_cast<E>(expr);                                                     \
    });                                                                                \
  }
MSL_FLOAT_FN2(pow, std::pow(f, g))
MSL_FLOAT_FN2(powr, std::pow(f, g))
MSL_FLOAT_FN2(fmod, std::fmod(f, g))
MSL_FLOAT_FN2(atan2, std::atan2(f, g))
MSL_FLOAT_FN2(copysign, std::copysign(f, g))
#undef MSL_FLOAT_FN2

template <class V>
inline V fma(V a, V b, V c) {
  if constexpr (::msl::is_vec<V>) {
    V r;
    for (int i = 0; i < ::msl::vec_traits<V>::size; ++i) r[i] = fma(a[i], b[i], c[i]);
    return r;
  } else {
    return static_cast<V>(std::fma(static_cast<float>(a), static_cast<float>(b), static_cast<float>(c)));
  }
}
template <class V, class S>
inline V mix(V x, V y, S a) { return x + (y - x) * a; }
template <class V>
inline V select(V a, V b, bool c) { return c ? b : a; }
template <class V>
inline ::msl::elem_t<V> dot(V a, V b) {
  ::msl::elem_t<V> s = 0;
  for (int i = 0; i < ::msl::vec_traits<V>::size; ++i) s += a[i] * b[i];
  return s;
}
template <class V>
inline ::msl::elem_t<V> length(V a) { return sqrt(dot(a, a)); }

namespace fast {
using namespace ::metal;
}
namespace precise {
using namespace ::metal;
}

// ---------------------------------------------------------- barriers

#define MSL_SITE unsigned line = __builtin_LINE(), unsigned col = __builtin_COLUMN()

inline void threadgroup_barrier(mem_flags flags, MSL_SITE) { ::msl::rt::barrier(unsigned(flags), line, col); }

// ------------------------------------------------------------ SIMD groups

struct simd_vote {
  using vote_t = uint64_t;
  vote_t bits = 0;
  constexpr simd_vote() = default;
  constexpr explicit simd_vote(vote_t v) : bits(v) {}
  constexpr explicit operator vote_t() const { return bits; }
  constexpr bool any() const { return bits != 0; }
};

}  // namespace metal

namespace msl {
// Every lane's value at one completed SIMD operation.
template <class T>
struct SimdValues {
  const rt::SimdSnapshot* snap;
  unsigned self;
  bool active(unsigned lane) const { return lane < 32 && (snap->mask >> lane & 1u); }
  T at(unsigned lane) const {  // lanes that did not take part hold poison
    T v;
    __builtin_memcpy(&v, snap->data[lane & 31u], sizeof(T));
    return v;
  }
};

template <class T>
inline SimdValues<T> exchange(const T& x, unsigned lane, unsigned line, unsigned col) {
  static_assert(sizeof(T) <= rt::kSlotBytes, "SIMD operation on a value over 64 bytes");
  alignas(16) unsigned char buf[rt::kSlotBytes] = {};
  __builtin_memcpy(buf, &x, sizeof(T));
  return {rt::simd_sync(buf, sizeof(T), line, col), lane};
}

template <class T, class F>
inline T reduce(const SimdValues<T>& v, unsigned first, unsigned count, F op) {
  bool any = false;
  T r{};
  for (unsigned i = first; i < first + count; ++i) {
    if (!v.active(i)) continue;
    r = any ? op(r, v.at(i)) : v.at(i);
    any = true;
  }
  return r;
}
}  // namespace msl

namespace metal {
inline unsigned msl_lane_() { return ::msl::rt::current_lane(); }

#define MSL_SIMD_REDUCE(name, first, count, op)                                        \
  template <class T>                                                                   \
  inline T name(T x, MSL_SITE) {                                                       \
    auto v = ::msl::exchange(x, msl_lane_(), line, col);                              \
    return ::msl::reduce(v, first, count, [](T a, T b) { return op; });                \
  }
MSL_SIMD_REDUCE(simd_sum, 0u, 32u, a + b)
MSL_SIMD_REDUCE(simd_product, 0u, 32u, a * b)
MSL_SIMD_REDUCE(simd_max, 0u, 32u, max(a, b))
MSL_SIMD_REDUCE(simd_min, 0u, 32u, min(a, b))
MSL_SIMD_REDUCE(simd_and, 0u, 32u, a & b)
MSL_SIMD_REDUCE(simd_or, 0u, 32u, a | b)
MSL_SIMD_REDUCE(simd_xor, 0u, 32u, a ^ b)
MSL_SIMD_REDUCE(quad_sum, v.self & ~3u, 4u, a + b)
MSL_SIMD_REDUCE(quad_max, v.self & ~3u, 4u, max(a, b))
MSL_SIMD_REDUCE(quad_min, v.self & ~3u, 4u, min(a, b))
#undef MSL_SIMD_REDUCE

template <class T>
inline T simd_prefix_inclusive_sum(T x, MSL_SITE) {
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  T r = T(0);
  for (unsigned i = 0; i <= v.self; ++i)
    if (v.active(i)) r += v.at(i);
  return r;
}
template <class T>
inline T simd_prefix_exclusive_sum(T x, MSL_SITE) {
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  T r = T(0);
  for (unsigned i = 0; i < v.self; ++i)
    if (v.active(i)) r += v.at(i);
  return r;
}

template <class T>
inline T simd_shuffle(T x, unsigned lane, MSL_SITE) { return ::msl::exchange(x, msl_lane_(), line, col).at(lane); }
template <class T>
inline T simd_broadcast(T x, unsigned lane, MSL_SITE) { return ::msl::exchange(x, msl_lane_(), line, col).at(lane); }
template <class T>
inline T simd_shuffle_xor(T x, unsigned mask, MSL_SITE) {
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  return v.at(v.self ^ mask);
}
template <class T>
inline T simd_shuffle_down(T x, unsigned delta, MSL_SITE) {  // the top `delta` lanes keep their value
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  return v.self + delta < 32 ? v.at(v.self + delta) : x;
}
template <class T>
inline T simd_shuffle_up(T x, unsigned delta, MSL_SITE) {
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  return v.self >= delta ? v.at(v.self - delta) : x;
}
template <class T>
inline T simd_shuffle_rotate_down(T x, unsigned delta, MSL_SITE) {
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  return v.at((v.self + delta) % 32u);
}
template <class T>
inline T simd_shuffle_rotate_up(T x, unsigned delta, MSL_SITE) {
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  return v.at((v.self + 32u - delta % 32u) % 32u);
}
template <class T>
inline T simd_broadcast_first(T x, MSL_SITE) {
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  for (unsigned i = 0; i < 32; ++i)
    if (v.active(i)) return v.at(i);
  return x;
}
template <class T>
inline T quad_shuffle(T x, unsigned lane, MSL_SITE) {
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  return v.at((v.self & ~3u) + (lane & 3u));
}
template <class T>
inline T quad_broadcast(T x, unsigned lane, MSL_SITE) { return quad_shuffle(x, lane, line, col); }
template <class T>
inline T quad_shuffle_xor(T x, unsigned mask, MSL_SITE) {
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  return v.at((v.self & ~3u) + ((v.self ^ mask) & 3u));
}
template <class T>
inline T quad_shuffle_down(T x, unsigned delta, MSL_SITE) {
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  return (v.self & 3u) + delta < 4 ? v.at(v.self + delta) : x;
}
template <class T>
inline T quad_shuffle_up(T x, unsigned delta, MSL_SITE) {
  auto v = ::msl::exchange(x, msl_lane_(), line, col);
  return (v.self & 3u) >= delta ? v.at(v.self - delta) : x;
}

inline simd_vote simd_ballot(bool pred, MSL_SITE) {
  auto v = ::msl::exchange(pred, msl_lane_(), line, col);
  uint64_t bits = 0;
  for (unsigned i = 0; i < 32; ++i)
    if (v.active(i) && v.at(i)) bits |= uint64_t(1) << i;
  return simd_vote(bits);
}
inline simd_vote simd_active_threads_mask(MSL_SITE) {
  auto v = ::msl::exchange(true, msl_lane_(), line, col);
  return simd_vote(v.snap->mask);
}
inline bool simd_all(bool pred, MSL_SITE) {
  auto v = ::msl::exchange(pred, msl_lane_(), line, col);
  for (unsigned i = 0; i < 32; ++i)
    if (v.active(i) && !v.at(i)) return false;
  return true;
}
inline bool simd_any(bool pred, MSL_SITE) {
  auto v = ::msl::exchange(pred, msl_lane_(), line, col);
  for (unsigned i = 0; i < 32; ++i)
    if (v.active(i) && v.at(i)) return true;
  return false;
}
inline bool simd_is_first(MSL_SITE) {
  auto v = ::msl::exchange(true, msl_lane_(), line, col);
  return v.snap->mask && (v.snap->mask & ((1u << v.self) - 1u)) == 0;
}
inline void simdgroup_barrier(mem_flags, MSL_SITE) { ::msl::exchange(true, msl_lane_(), line, col); }

// ---------------------------------------------------------------- atomics
// Relaxed device atomics; floats add through compare-and-swap. Loads let
// other threads run, so spin-waits progress (or are reported as deadlocks).
template <class T>
struct atomic {
  T value;
};
using atomic_int = atomic<int>;
using atomic_uint = atomic<unsigned int>;
using atomic_float = atomic<float>;

template <class T>
inline T atomic_load_explicit(const atomic<T>* o, memory_order) {
  T v;
  __atomic_load(&o->value, &v, __ATOMIC_SEQ_CST);
  ::msl::rt::spin_point();
  return v;
}
template <class T, class U>
inline void atomic_store_explicit(atomic<T>* o, U x, memory_order) {
  T v = static_cast<T>(x);
  __atomic_store(&o->value, &v, __ATOMIC_SEQ_CST);
}
template <class T, class U>
inline T atomic_exchange_explicit(atomic<T>* o, U x, memory_order) {
  T v = static_cast<T>(x), old;
  __atomic_exchange(&o->value, &v, &old, __ATOMIC_SEQ_CST);
  return old;
}
template <class T, class U>
inline bool atomic_compare_exchange_weak_explicit(atomic<T>* o, T* expected, U desired, memory_order,
                                                  memory_order) {
  T d = static_cast<T>(desired);
  bool ok = __atomic_compare_exchange(&o->value, expected, &d, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  if (!ok) ::msl::rt::spin_point();
  return ok;
}
template <class T, class F>
inline T __msl_atomic_update(atomic<T>* o, F f) {
  T old;
  __atomic_load(&o->value, &old, __ATOMIC_SEQ_CST);
  for (;;) {
    T next = f(old);
    if (__atomic_compare_exchange(&o->value, &old, &next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return old;
  }
}
#define MSL_ATOMIC_RMW(name, expr)                                                           \
  template <class T, class U>                                                                \
  inline T name(atomic<T>* o, U x, memory_order) {                                           \
    T b = static_cast<T>(x);                                                                 \
    return __msl_atomic_update(o, [b](T a) { return static_cast<T>(expr); });                \
  }
MSL_ATOMIC_RMW(atomic_fetch_add_explicit, a + b)
MSL_ATOMIC_RMW(atomic_fetch_sub_explicit, a - b)
MSL_ATOMIC_RMW(atomic_fetch_max_explicit, max(a, b))
MSL_ATOMIC_RMW(atomic_fetch_min_explicit, min(a, b))
MSL_ATOMIC_RMW(atomic_fetch_and_explicit, a & b)
MSL_ATOMIC_RMW(atomic_fetch_or_explicit, a | b)
MSL_ATOMIC_RMW(atomic_fetch_xor_explicit, a ^ b)
#undef MSL_ATOMIC_RMW

}  // namespace metal

using namespace metal;

// ------------------------------------------------ MLX's metal::utils() subset

template <typename U>
struct WorkPerThread {
  static_assert(sizeof(U) <= 8, "Type too large");
  static constexpr int n = 8 / sizeof(U);
};

template <typename U>
struct Limits {
  static constexpr U max = metal::numeric_limits<U>::max();
  static constexpr U min = metal::numeric_limits<U>::min();
  static constexpr U finite_max = metal::numeric_limits<U>::max();
  static constexpr U finite_min = metal::numeric_limits<U>::min();
};
#define MSL_FLOAT_LIMIT(type)                                              \
  template <>                                                              \
  struct Limits<type> {                                                    \
    static constexpr type max = metal::numeric_limits<type>::infinity();   \
    static constexpr type min = -metal::numeric_limits<type>::infinity();  \
    static constexpr type finite_max = metal::numeric_limits<type>::max(); \
    static constexpr type finite_min = -metal::numeric_limits<type>::max(); \
  };
MSL_FLOAT_LIMIT(half)
MSL_FLOAT_LIMIT(float)
MSL_FLOAT_LIMIT(__bf16)
#undef MSL_FLOAT_LIMIT
template <>
struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename IdxT = int64_t>
inline IdxT elem_to_loc(vec<unsigned int, 3> elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}

// ---------------------------------------- glue for the generated entry point

namespace msl {
inline vec<unsigned int, 3> u3(const uint32_t (&v)[3]) {
  vec<unsigned int, 3> r;
  r.x = v[0];
  r.y = v[1];
  r.z = v[2];
  return r;
}
#define MSL_ATTR3(name) \
  inline vec<unsigned int, 3> attr_##name(const rt::ThreadAttrs& a) { return u3(a.name); }
#define MSL_ATTR1(name) \
  inline unsigned int attr_##name(const rt::ThreadAttrs& a) { return a.name; }
MSL_ATTR3(thread_position_in_grid)
MSL_ATTR3(thread_position_in_threadgroup)
MSL_ATTR3(threadgroup_position_in_grid)
MSL_ATTR3(threads_per_threadgroup)
MSL_ATTR3(dispatch_threads_per_threadgroup)
MSL_ATTR3(threadgroups_per_grid)
MSL_ATTR3(threads_per_grid)
MSL_ATTR1(thread_index_in_threadgroup)
MSL_ATTR1(simdgroup_index_in_threadgroup)
MSL_ATTR1(thread_index_in_simdgroup)
MSL_ATTR1(simdgroups_per_threadgroup)
MSL_ATTR1(dispatch_simdgroups_per_threadgroup)
MSL_ATTR1(quadgroup_index_in_threadgroup)
MSL_ATTR1(thread_index_in_quadgroup)
MSL_ATTR1(quadgroups_per_threadgroup)
MSL_ATTR1(dispatch_quadgroups_per_threadgroup)
#undef MSL_ATTR3
#undef MSL_ATTR1
inline vec<unsigned int, 3> attr_grid_size(const rt::ThreadAttrs& a) { return u3(a.threads_per_grid); }
inline vec<unsigned int, 3> attr_grid_origin(const rt::ThreadAttrs&) { return ::msl::make_vec<unsigned int, 3>(0u); }
inline unsigned int attr_thread_execution_width(const rt::ThreadAttrs&) { return 32; }
inline unsigned int attr_threads_per_simdgroup(const rt::ThreadAttrs&) { return 32; }
}  // namespace msl
