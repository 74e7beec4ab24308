// Vector math: the Acc type, dot/axpy, 8-float vectors (GCC/Clang vector extensions), loads that
// convert bfloat16/float16, exp8/log8, horizontal reductions and the score micro-kernels.
// Part of the CPU kernels' single source (attention_kernel_impl.h includes the parts in order): not a normal
// header. Compiled once per instruction set inside `namespace hierkern::cpu::<isa>`, it may only use what
// kernel_common.h included, and what the parts before it define.

// Numbers accumulate in Acc: float for float/bfloat16/half inputs, double for double inputs.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// b and x are rows of a tensor (any dtype, converted to A as they are read) or of an A buffer.
template <typename A, typename T>
inline A dot(const A* __restrict a, const T* __restrict b, int64_t n) {
  A acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += a[d] * static_cast<A>(b[d]);
  return acc;
}

template <typename A, typename T>
inline void axpy(A* __restrict y, A alpha, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * static_cast<A>(x[d]);
}

// exp over 8 floats to ~2 ulp (Cephes' polynomial, range reduction by powers of 2), written with GCC/Clang
// vector extensions so that it is vector code on every target (two SSE halves on the baseline build, one
// AVX2 register in kernel_avx2.cpp): libm's exp is scalar and rows are too short to auto-vectorise.
// Inputs below -87.3 (where exp underflows) give exactly 0, so -inf padding contributes nothing.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x8_unaligned __attribute__((vector_size(32), aligned(4)));

// The same 256 bits seen as the other lane type: a vector cast reinterprets (a reference cast would break
// strict aliasing).
inline i32x8 bits_of(f32x8 x) {
  return (i32x8)x;
}
inline f32x8 float_of(i32x8 x) {
  return (f32x8)x;
}

inline f32x8 load8(const float* p) {
  return *reinterpret_cast<const f32x8_unaligned*>(p);
}
// Not `f32x8{} + x`: 0 + x is not an identity (x = -0), so that costs an add before the broadcast.
inline f32x8 bcast8(float x) {
  return f32x8{x, x, x, x, x, x, x, x};
}
inline void store8(float* p, f32x8 x) {
  *reinterpret_cast<f32x8_unaligned*>(p) = x;
}

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

// Eight bfloat16/float16 values as floats: the blocked kernels read the keys and values of segments too long to
// convert into bounded scratch (kConvertBytes) in place, converting in registers.
inline u16x8 load_halves(const void* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  return h;
}

inline f32x8 load8(const c10::BFloat16* p) {
  return float_of(__builtin_convertvector(load_halves(p), i32x8) << 16);
}

inline f32x8 load8(const c10::Half* p) {
#if defined(HIERKERN_AVX2_BUILT)  // kernel_avx2.cpp, compiled with F16C
  return (f32x8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  // c10's fp16_ieee_to_fp32_value in eight lanes: exact for normals, subnormals, infinities and NaNs.
  const u32x8 w = __builtin_convertvector(load_halves(p), u32x8) << 16;
  const u32x8 two_w = w + w;
  const f32x8 normal = float_of((i32x8)((two_w >> 4) + (0xE0u << 23))) * 0x1.0p-112f;
  const f32x8 subnormal = float_of((i32x8)((two_w >> 17) | (126u << 23))) - 0.5f;
  const i32x8 magnitude = two_w < (1u << 27) ? bits_of(subnormal) : bits_of(normal);
  return float_of((i32x8)(w & 0x80000000u) | magnitude);
#endif
}

inline f32x8 exp8(f32x8 x_in) {
  const f32x8 lo = f32x8{} - 87.3f, hi = f32x8{} + 88.3f;
  f32x8 x = x_in < lo ? lo : x_in;
  x = x > hi ? hi : x;
  // Round x*log2(e) to nearest with the 1.5*2^23 trick; the low mantissa bits of `shifted` are the integer n.
  const f32x8 shifted = x * 1.44269504088896341f + 12582912.0f;
  const f32x8 n = shifted - 12582912.0f;
  const i32x8 n_bits = bits_of(shifted) - 0x4B400000;
  f32x8 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const f32x8 r2 = r * r;
  f32x8 y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const i32x8 scale_bits = (n_bits + 127) << 23;
  const f32x8 result = y * float_of(scale_bits);
  return x_in < lo ? f32x8{} : result;
}

// Natural log over 8 positive, normal floats to ~1 ulp (Cephes' logf polynomial on the mantissa in
// [sqrt(1/2), sqrt(2)), exponent added back in two parts): eight libm calls per eight rows would cost more
// than a short row's whole softmax.
inline f32x8 log8(f32x8 x) {
  const i32x8 bits = bits_of(x);
  const i32x8 mantissa_bits = (bits & 0x807fffff) | 0x3f000000;  // the mantissa as a float in [0.5, 1)
  f32x8 m = float_of(mantissa_bits);
  f32x8 e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, f32x8);
  const auto small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = (small ? m + m : m) - 1.0f;
  const f32x8 z = m * m;
  f32x8 y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// The lanes [0, n - jb) of x, the others `fill` (by default -inf: the scores of a block of keys with the
// invisible ones masked). A select, not a product: those lanes may hold anything, an inf or a NaN included.
inline f32x8 mask_past(f32x8 x, int64_t jb, int64_t n, float fill = -INFINITY) {
  const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return lane < static_cast<int32_t>(std::min<int64_t>(n - jb, 8)) ? x : f32x8{} + fill;
}

// Maximum and sum of the eight lanes by halving shuffles, every lane holding the result: no round trip through
// memory, and no scalar chain of seven dependent operations.
inline f32x8 hmax8(f32x8 x) {
  f32x8 y = __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
  x = x > y ? x : y;
  y = __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
  x = x > y ? x : y;
  y = __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
  return x > y ? x : y;
}

inline f32x8 hsum8(f32x8 x) {
  x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
  x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
  return x + __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
}

// s[j] = exp(s[j] - shift) for j < n, and returns their sum. Rows are short (a word has ~5 keys), shorter than
// one vector: exp runs over whole vectors with the lanes past n masked, so s needs room for n rounded up to 8.
inline float exp_shifted(float* __restrict s, int64_t n, float shift) {
  f32x8 sum{};
  for (int64_t j = 0; j < n; j += 8) {
    const f32x8 x = exp8(mask_past(load8(s + j) - shift, j, n));
    store8(s + j, x);
    sum += x;
  }
  return hsum8(sum)[0];
}

inline double exp_shifted(double* __restrict s, int64_t n, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - shift));
  return sum;
}

// Lane t of the result is the sum of the eight lanes of part[t]: a transposing add tree (21 shuffles/adds
// instead of 8 horizontal reductions) that reduces every lane in the same order.
__attribute__((always_inline)) inline f32x8 transpose_sum8(const f32x8* part) {
  f32x8 a[4], b[2];
  for (int t = 0; t < 4; ++t)
    a[t] = __builtin_shufflevector(part[2 * t], part[2 * t + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(part[2 * t], part[2 * t + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int t = 0; t < 2; ++t)
    b[t] = __builtin_shufflevector(a[2 * t], a[2 * t + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(a[2 * t], a[2 * t + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(b[0], b[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(b[0], b[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// Dot products of eight (query, key) row pairs of head dim kD (a multiple of 8) as one vector: lane l is
// q[l] . (k[l] + offset).
template <int kD>
__attribute__((always_inline)) inline f32x8 dot8_lanes(const float* const* q, const float* const* k, int64_t offset) {
  f32x8 part[8];
#pragma GCC unroll 8
  for (int l = 0; l < 8; ++l) {
    const float* kl = k[l] + offset;
    part[l] = load8(q[l]) * load8(kl);
#pragma GCC unroll 16
    for (int c = 8; c < kD; c += 8) part[l] += load8(q[l] + c) * load8(kl + c);
  }
  return transpose_sum8(part);
}

// Scores of one query row against keys [0, n), head dim kD (a multiple of 8): s[j] = q . key(j) (key(j) a row of
// floats, bfloat16 or float16), eight keys at a time, each dot product kept as 8 partial sums and the eight
// reduced together (transpose_sum8), stored as whole vectors so that exp_shifted reads them back without a
// store-forwarding stall. Returns the row maximum.
template <int kD, typename RowFn>
inline float scores8(float* __restrict s, const float* __restrict q, int64_t n, RowFn&& key) {
  static_assert(kD > 0 && kD % 8 == 0, "scores8 needs a head dim that is a multiple of 8");
  f32x8 row_max = f32x8{} - INFINITY;
  for (int64_t jb = 0; jb < n; jb += 8) {
    // Lanes past n repeat the last key instead of branching, so that part[] stays in registers; they are
    // masked below.
    f32x8 part[8];
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      const auto* k = key(std::min<int64_t>(jb + t, n - 1));
      part[t] = load8(q) * load8(k);
#pragma GCC unroll 16
      for (int c = 8; c < kD; c += 8) part[t] += load8(q + c) * load8(k + c);
    }
    const f32x8 sums = transpose_sum8(part);
    store8(s + jb, sums);
    const f32x8 visible = mask_past(sums, jb, n);
    row_max = visible > row_max ? visible : row_max;
  }
  return hmax8(row_max)[0];
}
