// The CPU varlen attention kernels. Not a normal header: kernel_<isa>.cpp includes it once inside
// `namespace hierkern::cpu::<isa>` after choosing the code-generation target, so the same source is compiled
// for several instruction sets. It must only include what kernel_common.h already included.
//
// One unit of work is (segment, kv-head). A query row's visible keys are the prefix [0, n) of the segment's keys
// (causal bottom-right alignment makes it a prefix), so there is no masking work beyond the row's end.
//
// Float accumulation with head dim 32/64/128 (the fast paths):
// - segments of fewer than kFwdBlockMinKeys (forward) or kBwdBlockMinKeys (backward) keys, i.e. words: eight
//   (query row, head) pairs side by side, one per vector lane, so that a short row's softmax needs no
//   horizontal reduction (fwd_short_segment, bwd_short_segment);
// - forward, longer segments: one head at a time, kBlockRows query rows per block, P @ V for two rows per pass
//   over the values (fwd_block, combine2);
// - backward, segments of at least kBwdBlockMinKeys keys: kBwdRows rows per block, dq = dS @ K two rows at a
//   time and dk/dv as rank updates over the whole block with two keys x 32 columns held in registers
//   (bwd_block, rank_update).
// Everything else (double, other head dims) goes one query row at a time with the row's scores in a per-thread
// buffer; its inner loops are written so the compiler vectorises them (`omp simd` reductions), and exp is
// explicit vector code (exp8).
// bfloat16/float16 inputs: the keys and values of a kv head (of all heads of a short segment) are converted to
// float once, into per-thread scratch of at most kConvertBytes; longer segments are read in place and converted
// as they are read, so that no thread's scratch grows with a long segment's keys times its kv heads.
// Masked keys are skipped or selected away, never multiplied by a zero weight: a token's inf or NaN reaches only
// the rows that attend to it (0 * inf would be NaN).
// Each row's arithmetic keeps the same order whatever the thread count, so results stay bit-identical.

// Numbers accumulate in Acc: float for float/bfloat16/half inputs, double for double inputs.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

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
inline i32x8 bits_of(f32x8 x) { return (i32x8)x; }
inline f32x8 float_of(i32x8 x) { return (f32x8)x; }

inline f32x8 load8(const float* p) { return *reinterpret_cast<const f32x8_unaligned*>(p); }
// Not `f32x8{} + x`: 0 + x is not an identity (x = -0), so that costs an add before the broadcast.
inline f32x8 bcast8(float x) { return f32x8{x, x, x, x, x, x, x, x}; }
inline void store8(float* p, f32x8 x) { *reinterpret_cast<f32x8_unaligned*>(p) = x; }

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
__attribute__((always_inline)) inline f32x8 dot8_lanes(const float* const* q, const float* const* k,
                                                        int64_t offset) {
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

// Number of keys query row i sees: all of them, or the causal prefix aligned bottom-right.
inline int64_t visible_keys(int64_t i, int64_t lq, int64_t lk, bool causal) {
  if (!causal) return lk;
  const int64_t n = i + lk - lq + 1;
  return n < 0 ? 0 : (n > lk ? lk : n);
}

// The high and low 32 bits of m * x in each of 8 lanes. Generic vectors would make GCC emulate full 64-bit
// products (three multiplies each); x86's 32x32->64-bit multiply takes the even lanes and, after a 32-bit
// shift, the odd ones.
inline void mulhilo8(uint32_t m, u32x8 x, u32x8& hi, u32x8& lo) {
  u32x8 even, odd;  // [lo, hi] of the products of lanes (0, 2, 4, 6) and (1, 3, 5, 7)
#if defined(HIERKERN_AVX2_BUILT)  // kernel_avx2.cpp
  const __m256i xv = (__m256i)x, mv = _mm256_set1_epi32(static_cast<int>(m));
  even = (u32x8)_mm256_mul_epu32(xv, mv);
  odd = (u32x8)_mm256_mul_epu32(_mm256_srli_epi64(xv, 32), mv);
#elif defined(__SSE2__)
  typedef uint32_t u32x4 __attribute__((vector_size(16)));
  const __m128i mv = _mm_set1_epi32(static_cast<int>(m));
  const __m128i x0 = (__m128i)__builtin_shufflevector(x, x, 0, 1, 2, 3);
  const __m128i x1 = (__m128i)__builtin_shufflevector(x, x, 4, 5, 6, 7);
  const u32x4 e0 = (u32x4)_mm_mul_epu32(x0, mv), e1 = (u32x4)_mm_mul_epu32(x1, mv);
  const u32x4 o0 = (u32x4)_mm_mul_epu32(_mm_srli_epi64(x0, 32), mv);
  const u32x4 o1 = (u32x4)_mm_mul_epu32(_mm_srli_epi64(x1, 32), mv);
  even = __builtin_shufflevector(e0, e1, 0, 1, 2, 3, 4, 5, 6, 7);
  odd = __builtin_shufflevector(o0, o1, 0, 1, 2, 3, 4, 5, 6, 7);
#else
  for (int l = 0; l < 4; ++l) {
    const uint64_t pe = static_cast<uint64_t>(m) * x[2 * l], po = static_cast<uint64_t>(m) * x[2 * l + 1];
    even[2 * l] = static_cast<uint32_t>(pe), even[2 * l + 1] = static_cast<uint32_t>(pe >> 32);
    odd[2 * l] = static_cast<uint32_t>(po), odd[2 * l + 1] = static_cast<uint32_t>(po >> 32);
  }
#endif
  lo = __builtin_shufflevector(even, odd, 0, 8, 2, 10, 4, 12, 6, 14);
  hi = __builtin_shufflevector(even, odd, 1, 9, 3, 11, 5, 13, 7, 15);
}

// Whether dropout keeps each of eight attention weights (head[l], query[l], key[l]) (query and key as packed
// token indices): ::hierkern::cuda::dropout_keep's Philox4x32-10 in eight lanes at once, since one scalar draw
// costs about as much as a short row's softmax. -1 where kept, 0 where dropped.
inline i32x8 dropout_keep8(const AttentionParams& p, u32x8 head, u32x8 query, u32x8 key) {
  u32x8 c0 = query, c1 = key, c2 = head, c3 = u32x8{} + static_cast<uint32_t>(p.dropout_offset);
  uint32_t k0 = static_cast<uint32_t>(p.dropout_seed);
  uint32_t k1 = static_cast<uint32_t>(p.dropout_seed >> 32) ^ static_cast<uint32_t>(p.dropout_offset >> 32);
  for (int round = 0; round < 10; ++round) {
    u32x8 hi0, lo0, hi1, lo1;
    mulhilo8(0xD2511F53u, c0, hi0, lo0);
    mulhilo8(0xCD9E8D57u, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0 >= p.dropout_threshold;
}

// Dropout's factors, in precision A, for the weights of one query row (head, query) against keys key0 + j,
// j < n (n <= 8): 1 / (1 - dropout_p) where kept, else 0.
template <typename A>
inline void dropout_factors(const AttentionParams& p, int64_t head, int64_t query, int64_t key0, int64_t n,
                            A* factor) {
  const u32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const i32x8 keep = dropout_keep8(p, u32x8{} + static_cast<uint32_t>(head), u32x8{} + static_cast<uint32_t>(query),
                                   lane + static_cast<uint32_t>(key0));
  for (int64_t l = 0; l < n; ++l) factor[l] = keep[l] ? static_cast<A>(p.dropout_scale) : A(0);
}

// Dropout on one query row (head, query) of probabilities against keys key0 + j, j < n, in place: the weights
// P @ V uses (the normaliser and lse stay the undropped softmax's).
template <typename A>
inline void apply_dropout(const AttentionParams& p, int64_t head, int64_t query, int64_t key0, int64_t n, A* s) {
  A factor[8];
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t m = std::min<int64_t>(8, n - j0);
    dropout_factors(p, head, query, key0 + j0, m, factor);
    for (int64_t j = 0; j < m; ++j) s[j0 + j] *= factor[j];
  }
}

// sum_{j < n} w[j] * x[j] / sum_{j < n} w[j]. The float version reads whole vectors (w and x must be readable
// up to n rounded up to 8) and selects the lanes past n away, whatever they hold.
inline float weighted_mean(const float* __restrict w, const float* __restrict x, int64_t n) {
  f32x8 num{}, den{};
  for (int64_t j = 0; j < n; j += 8) {
    const f32x8 wj = mask_past(load8(w + j), j, n, 0.0f);
    num += mask_past(wj * load8(x + j), j, n, 0.0f);
    den += wj;
  }
  return hsum8(num)[0] / hsum8(den)[0];
}

inline double weighted_mean(const double* __restrict w, const double* __restrict x, int64_t n) {
  double num = 0, den = 0;
  for (int64_t j = 0; j < n; ++j) num += w[j] * x[j], den += w[j];
  return num / den;
}

// The softmax's backward for one query row (head, query) against keys key0 + j, j < n, in place: dS[j] holds
// dP = dout . v_j on entry and dS = P * (keep * dP - delta) on exit, and P[j] becomes P * keep, the weight
// that dV sees. keep is dropout's factor (1 without dropout), kept in `factor` (n values of scratch) between
// the two passes. delta = sum_j P * keep * dP / sum_j P equals rowsum(dout * out), but summed from the
// probabilities in Acc rather than from out rounded to the input dtype: dS is a small difference of close
// numbers when the softmax is peaky, and out's rounding error (2^-9 of |out| in bfloat16) would swamp it.
// Dividing by sum_j P (1 but for rounding) makes dS sum to zero over the row as the softmax's Jacobian does:
// P recomputed from a float lse is off by about |score| * eps, and undivided that error would reach dS (a
// one-key row, whose dS is 0, would get P * dP * (1 - P)).
template <typename A>
inline void softmax_backward_row(const AttentionParams& p, int64_t head, int64_t query, int64_t key0, int64_t n,
                                 A* __restrict P, A* __restrict dS, A* __restrict factor) {
  if (p.dropout_p > 0.0) {
    for (int64_t j0 = 0; j0 < n; j0 += 8) dropout_factors(p, head, query, key0 + j0, std::min<int64_t>(8, n - j0),
                                                          factor + j0);
    for (int64_t j = 0; j < n; ++j) dS[j] *= factor[j];
  }
  const A delta = weighted_mean(P, dS, n);
  for (int64_t j = 0; j < n; ++j) dS[j] = P[j] * (dS[j] - delta);
  if (p.dropout_p > 0.0)
    for (int64_t j = 0; j < n; ++j) P[j] *= factor[j];
}

template <typename T, typename A>
inline void load_row(A* __restrict dst, const T* __restrict src, int64_t d, A scale) {
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<A>(src[c]) * scale;
}

// Rows of a run of kv heads [g0, g1) of one segment as Acc values, row(g, j) being key j of head g0 + g: keys
// and values (load_block), or dk/dv accumulators.
template <typename A>
struct Block {
  A* base;
  int64_t row_stride, head_stride;
  A* row(int64_t g, int64_t j) const { return base + g * head_stride + j * row_stride; }
};

// The tensor itself when T == Acc (no copy), else converted once into `scratch`, so that the lane-parallel
// kernels, which use each row of a short segment for every query of it, never convert in their inner loops.
template <typename T, typename A>
Block<const A> load_block(const T* src, int64_t row_stride, int64_t head_stride, int64_t rows, int64_t heads,
                          int64_t d, A* scratch) {
  if constexpr (std::is_same_v<T, A>) {
    return {src, row_stride, head_stride};
  } else {
    for (int64_t g = 0; g < heads; ++g)
      for (int64_t j = 0; j < rows; ++j) {
        const T* s = src + g * head_stride + j * row_stride;
        A* o = scratch + (g * rows + j) * d;
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<A>(s[c]);
      }
    return {scratch, d, rows * d};
  }
}

// Segments with at least this many keys take the blocked float paths (rows of one head at a time), shorter ones
// the lane-parallel kernels. Measured on one thread, 19.6k tokens: forward at 16-17 keys 13 ms lane-parallel
// vs 14-16.5 ms blocked, on par at 32; backward on par from 16 to 17 keys (30-33 ms either way), where the
// blocked one's dk/dv rank updates start to pay.
constexpr int64_t kFwdBlockMinKeys = 32;
constexpr int64_t kBwdBlockMinKeys = 16;
constexpr int64_t kBlockRows = 4;
// Query rows per backward block: dk/dv rows are read and written once per block, so bigger is better up to
// the scratch it costs (2 x kBwdRows score rows).
constexpr int64_t kBwdRows = 64;

template <typename A, int kD>
constexpr bool kBlocked = std::is_same_v<A, float> && kD > 0 && kD % 32 == 0;

// Per-thread scratch of one call of a *_units function (one call per thread and launch). The row buffers are
// sized once, for the longest segments of the thread's units; converted keys/values (non-Acc inputs: short
// segments, and runs that fit kConvertBytes) and dk/dv accumulators (non-Acc inputs; Acc inputs accumulate
// straight into dk/dv) grow on demand to what the largest run of kv heads needs.
template <typename A>
struct Scratch {
  std::vector<A> buf, kv, grads;
  // scores (and, backward, probs): a block of rows (kBlockRows forward, kBwdRows backward, at most the longest
  // query segment) of row_len (a multiple of 16); qrow (and dorow): as many rows of d; factor: one row_len.
  A *scores, *probs, *factor, *qrow, *dorow, *acc;
  int64_t row_len;
  Scratch(int64_t max_q, int64_t max_k, int64_t d, bool backward) {
    row_len = (max_k + 15) / 16 * 16;
    const int64_t rows = std::max<int64_t>(1, std::min(backward ? kBwdRows : kBlockRows, max_q));
    const int64_t row_sets = backward ? 2 : 1;
    buf.assign(row_sets * rows * row_len + (backward ? row_len : 0) + (row_sets * rows + 1) * d, A(0));
    A* p = buf.data();
    scores = p; p += rows * row_len;
    probs = backward ? p : nullptr; p += backward ? rows * row_len : 0;
    factor = backward ? p : nullptr; p += backward ? row_len : 0;
    qrow = p; p += rows * d;
    dorow = backward ? p : nullptr; p += backward ? rows * d : 0;
    acc = p;
  }
  static A* at_least(std::vector<A>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }
  // Room for converted keys and values, n values each (keys first).
  A* converted(int64_t n) { return at_least(kv, 2 * n); }
  // Room for dk and dv accumulators, n values each (dk first).
  A* accumulators(int64_t n) { return at_least(grads, 2 * n); }
};

inline int64_t max_segment_len(const int32_t* cu, int64_t begin_seg, int64_t end_seg) {
  int64_t longest = 0;
  for (int64_t s = begin_seg; s < end_seg; ++s) longest = std::max<int64_t>(longest, cu[s + 1] - cu[s]);
  return longest;
}

// Calls fn(segment, g0, g1) for each segment touched by units [unit_begin, unit_end), with the run of kv heads
// [g0, g1) of that segment inside the range.
template <typename F>
inline void for_each_segment_part(const AttentionParams& p, int64_t unit_begin, int64_t unit_end, F&& fn) {
  for (int64_t u = unit_begin; u < unit_end;) {
    const int64_t seg = u / p.num_kv_heads, g0 = u % p.num_kv_heads;
    const int64_t g1 = std::min(p.num_kv_heads, g0 + (unit_end - u));
    fn(seg, g0, g1);
    u += g1 - g0;
  }
}

// Whether the row kernels take a segment's rows in token order (every head of a row, then the next row) rather
// than head order. Token order reads q and writes out sequentially: tiny segments are bound by memory latency,
// and their keys and values for all heads stay in L1 anyway. Head order keeps one head's keys and values cached
// across rows, which long segments need. The choice depends on the segment and all its heads (num_heads),
// never on the share of heads a thread got, so every dk/dv row sums its terms in the same order whatever the
// split.
inline bool token_order(int64_t lk, int64_t num_heads, int64_t bytes_per_key) {
  return lk * num_heads * bytes_per_key <= (32 << 10);
}

// Calls fn(h, i) for query heads [h0, h1) and rows [0, lq), in token or head order.
template <typename F>
inline void for_each_row(bool by_token, int64_t h0, int64_t h1, int64_t lq, F&& fn) {
  if (by_token) {
    for (int64_t i = 0; i < lq; ++i)
      for (int64_t h = h0; h < h1; ++h) fn(h, i);
  } else {
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t i = 0; i < lq; ++i) fn(h, i);
  }
}

// acc[t] += w * x[8t .. 8t + 8) for t < 4: 32 columns of one weighted row (floats, bfloat16 or float16).
template <typename E>
__attribute__((always_inline)) inline void add_row32(f32x8* acc, f32x8 w, const E* x) {
  for (int t = 0; t < 4; ++t) acc[t] += w * load8(x + 8 * t);
}

// res_r[c] = sum_{j < n_r} w_r[j] * row(j)[c] for two weight rows at once: each loaded row chunk feeds both, and
// the sums stay in registers (32 columns x 2 rows = 8 vectors) instead of a memory accumulator whose
// store-to-load latency would serialise the key loop. Past the shorter row's n only the longer one
// accumulates: the rows it does not see may hold an inf, and 0 * inf would be NaN.
template <int kD, typename RowFn>
inline void combine2(float* __restrict res0, float* __restrict res1, const float* __restrict w0,
                     const float* __restrict w1, int64_t n0, int64_t n1, RowFn&& row) {
  const int64_t both = std::min(n0, n1);
  for (int c0 = 0; c0 < kD; c0 += 32) {
    f32x8 a0[4] = {}, a1[4] = {};
    for (int64_t j = 0; j < both; ++j) {
      const auto* x = row(j) + c0;
      const f32x8 b0 = bcast8(w0[j]), b1 = bcast8(w1[j]);
      for (int t = 0; t < 4; ++t) {
        const f32x8 xv = load8(x + 8 * t);
        a0[t] += b0 * xv;
        a1[t] += b1 * xv;
      }
    }
    for (int64_t j = both; j < n0; ++j) add_row32(a0, bcast8(w0[j]), row(j) + c0);
    for (int64_t j = both; j < n1; ++j) add_row32(a1, bcast8(w1[j]), row(j) + c0);
    for (int t = 0; t < 4; ++t) {
      store8(res0 + c0 + 8 * t, a0[t]);
      store8(res1 + c0 + 8 * t, a1[t]);
    }
  }
}

// Asks for rows [0, n) of row(j) (`bytes` each) to be brought into L2 while the current head is computed. The
// next head's rows are 1/H of each token's row, a stride the hardware prefetchers do not run ahead of, so
// without this each head of the forward starts with a burst of cache misses. (Measured: it slows the
// backward, which is not bound by those misses.)
template <typename RowFn>
inline void prefetch_rows(int64_t n, int64_t bytes, RowFn&& row) {
  for (int64_t j = 0; j < n; ++j) {
    const char* r = reinterpret_cast<const char*>(row(j));
    for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(r + c, 0, 1);
  }
}

// o = inv * sum_{j < n} w[j * w_stride] * row(j) for one output row, with the sums in registers: 32 columns at
// a time, even and odd keys in separate accumulators so that two independent FMA chains hide each other's
// latency (a memory accumulator would serialise the key loop on store-to-load forwarding).
template <typename T, int kD, typename RowFn>
inline void store_weighted_sum(T* __restrict o, const float* __restrict w, int64_t w_stride, int64_t n, float inv,
                               RowFn&& row) {
  for (int c0 = 0; c0 < kD; c0 += 32) {
    constexpr int kV = kD < 32 ? kD / 8 : 4;
    f32x8 even[kV] = {}, odd[kV] = {};
    int64_t j = 0;
    for (; j + 1 < n; j += 2) {
      const float *x0 = row(j) + c0, *x1 = row(j + 1) + c0;
      const f32x8 w0 = bcast8(w[j * w_stride]), w1 = bcast8(w[(j + 1) * w_stride]);
      for (int t = 0; t < kV; ++t) {
        even[t] += w0 * load8(x0 + 8 * t);
        odd[t] += w1 * load8(x1 + 8 * t);
      }
    }
    if (j < n) {
      const float* x0 = row(j) + c0;
      const f32x8 w0 = bcast8(w[j * w_stride]);
      for (int t = 0; t < kV; ++t) even[t] += w0 * load8(x0 + 8 * t);
    }
    for (int t = 0; t < kV; ++t) {
      const f32x8 res = (even[t] + odd[t]) * bcast8(inv);
      if constexpr (std::is_same_v<T, float>) {
        store8(o + c0 + 8 * t, res);
      } else {
        for (int e = 0; e < 8; ++e) o[c0 + 8 * t + e] = static_cast<T>(res[e]);
      }
    }
  }
}

// The (query row, query head) pairs of one segment's kv heads [g0, g1), in token order, eight at a time: one
// pair per vector lane of the short-segment kernels. Lanes past the last pair repeat it (the kernels compute
// them and do not store them).
class PairBatches {
 public:
  PairBatches(int64_t lq, int64_t kv_heads, int64_t group)
      : kv_heads_(kv_heads), group_(group), left_(lq * kv_heads * group) {}

  // Fills row[l] (query row in the segment), kv[l] (kv head, counted from g0) and rank[l] (query head within
  // kv head's group) for l < 8; returns how many lanes are real pairs, 0 when all pairs are done.
  int next(int64_t* row, int64_t* kv, int64_t* rank) {
    const int lanes = static_cast<int>(std::min<int64_t>(8, left_));
    left_ -= lanes;
    for (int l = 0; l < 8; ++l) {
      if (l >= lanes) {
        row[l] = row[lanes - 1], kv[l] = kv[lanes - 1], rank[l] = rank[lanes - 1];
        continue;
      }
      row[l] = i_, kv[l] = g_, rank[l] = r_;
      // Counted up rather than divided out of a pair index: a 64-bit division per lane costs more than a
      // short row's arithmetic.
      if (++r_ == group_) {
        r_ = 0;
        if (++g_ == kv_heads_) g_ = 0, ++i_;
      }
    }
    return lanes;
  }

 private:
  int64_t kv_heads_, group_, left_, i_ = 0, g_ = 0, r_ = 0;
};

// Rows of eight lanes as float: the rows themselves for float tensors, else converted into `converted`.
template <typename T, int kD>
struct LaneRows {
  const float* row[8];
  alignas(32) float converted[std::is_same_v<T, float> ? 1 : 8][kD];
  void set(int l, const T* src) {
    if constexpr (std::is_same_v<T, float>) {
      row[l] = src;
    } else {
      load_row(converted[l], src, kD, 1.0f);
      row[l] = converted[l];
    }
  }
};

// y += w * x over kD floats (kD a multiple of 8).
template <int kD>
inline void add_scaled(float* __restrict y, float w, const float* __restrict x) {
  const f32x8 wv = bcast8(w);
  for (int c = 0; c < kD; c += 8) store8(y + c, load8(y + c) + wv * load8(x + c));
}

// Forward of a segment with fewer than kFwdBlockMinKeys keys (float accumulation, kD a multiple of 8) for kv heads
// [g0, g1), eight (query row, head) pairs at a time (PairBatches). A short row's softmax is shorter than one
// vector and every step of it is latency bound, so rows go side by side: the scores of key j for the eight
// pairs form one vector, and max, exp, sum and 1/sum are lane-wise, with no horizontal reduction and one
// dependency chain per eight rows. A lane's arithmetic does not depend on its neighbours (the transposing add
// tree reduces every lane in the same order), so results stay bit-identical whatever the thread split.
template <typename T, int kD, typename A>
void fwd_short_segment(const AttentionParams& p, int64_t q0, int64_t lq, int64_t k0, int64_t lk, int64_t g0,
                       int64_t g1, const Block<const A>& keys, const Block<const A>& values) {
  static_assert(std::is_same_v<A, float> && kD > 0 && kD % 8 == 0, "fwd_short_segment is the float kernel");
  const int64_t group = p.num_heads / p.num_kv_heads;
  const T* q = static_cast<const T*>(p.q);
  T* out = static_cast<T*>(p.out);
  const f32x8 scale = bcast8(static_cast<float>(p.softmax_scale));
  alignas(32) float probs[kFwdBlockMinKeys * 8];  // probs[8 * j + lane]: scores, then probabilities
  LaneRows<T, kD> q_lane;
  const float *k_lane[8], *v_lane[8];
  alignas(32) int32_t n_lane[8];
  int64_t row[8], kv[8], rank[8];
  u32x8 heads, tokens;  // of the lanes, for the dropout mask
  PairBatches batches(lq, g1 - g0, group);
  while (const int lanes = batches.next(row, kv, rank)) {
    int64_t n_max = 0;
    for (int l = 0; l < 8; ++l) {
      const int64_t h = (g0 + kv[l]) * group + rank[l], t = q0 + row[l];
      heads[l] = static_cast<uint32_t>(h), tokens[l] = static_cast<uint32_t>(t);
      q_lane.set(l, q + t * p.q_row + h * p.q_head);
      k_lane[l] = keys.row(kv[l], 0);
      v_lane[l] = values.row(kv[l], 0);
      n_lane[l] = static_cast<int32_t>(visible_keys(row[l], lq, lk, p.causal));
      n_max = std::max<int64_t>(n_max, n_lane[l]);
    }
    const i32x8 n = *reinterpret_cast<const i32x8*>(n_lane);
    f32x8 row_max = f32x8{} - INFINITY;
    for (int64_t j = 0; j < n_max; ++j) {
      const f32x8 scores = dot8_lanes<kD>(q_lane.row, k_lane, j * keys.row_stride) * scale;
      const f32x8 visible = static_cast<int32_t>(j) < n ? scores : f32x8{} - INFINITY;
      store8(probs + 8 * j, visible);
      row_max = visible > row_max ? visible : row_max;
    }
    // A lane with no keys shifts by 0, so that its exp(-inf - shift) is 0 and not NaN.
    const f32x8 shift = row_max == f32x8{} - INFINITY ? f32x8{} : row_max;
    f32x8 sum{};
    for (int64_t j = 0; j < n_max; ++j) {
      const f32x8 e = exp8(load8(probs + 8 * j) - shift);
      store8(probs + 8 * j, e);
      sum += e;
    }
    // Dropout scales the weights of P @ V, not the normaliser: sum and lse are the undropped softmax's.
    if (p.dropout_p > 0.0) {
      const f32x8 kept = f32x8{} + static_cast<float>(p.dropout_scale);
      for (int64_t j = 0; j < n_max; ++j) {
        const i32x8 keep = dropout_keep8(p, heads, tokens, u32x8{} + static_cast<uint32_t>(k0 + j));
        store8(probs + 8 * j, load8(probs + 8 * j) * (keep ? kept : f32x8{}));
      }
    }
    // A lane whose visible keys all score -inf (an infinite input) gets softmax's 0/0, NaN, as the row kernels
    // do; only a lane with no visible key at all is zeros.
    const f32x8 inv = sum > f32x8{} ? 1.0f / sum : (n > 0 ? f32x8{} + NAN : f32x8{});
    // sum >= 1 where a lane has keys (its maximum contributes exp(0)), so log8 sees normal numbers only.
    const f32x8 lse = n > 0 ? row_max + log8(sum > f32x8{} ? sum : f32x8{} + 1.0f) : f32x8{} - INFINITY;
    for (int l = 0; l < lanes; ++l) {
      const int64_t h = heads[l], t = tokens[l];
      p.lse[h * p.total_q + t] = lse[l];
      const float* v_rows = v_lane[l];
      store_weighted_sum<T, kD>(out + t * p.out_row + h * p.out_head, probs + l, 8, n_lane[l], inv[l],
                                [&](int64_t j) { return v_rows + j * values.row_stride; });
    }
  }
}

// Backward of a segment with fewer than kBwdBlockMinKeys keys, the same way as fwd_short_segment: per key j,
// one vector each of scores, P (from lse) and dP = dout . v for eight pairs, summed into
// delta = sum_j P * dP / sum_j P (softmax_backward_row says why), then dS = P * (dP - delta)
// (under dropout, dP is keep * dP and dV takes P * keep). Then per lane dq = scale * dS @ K in registers, and
// dk += scale * dS^T q, dv += P^T dout into dk_acc/dv_acc, lane by lane in pair order, so each dk/dv row
// receives its terms in the same order whatever the batching (bit-identical across thread splits).
template <typename T, int kD, typename A>
void bwd_short_segment(const AttentionParams& p, int64_t q0, int64_t lq, int64_t k0, int64_t lk, int64_t g0,
                       int64_t g1, const Block<const A>& keys, const Block<const A>& values,
                       const Block<A>& dk_acc, const Block<A>& dv_acc) {
  static_assert(std::is_same_v<A, float> && kD > 0 && kD % 8 == 0, "bwd_short_segment is the float kernel");
  const int64_t group = p.num_heads / p.num_kv_heads, q_stride = p.num_heads * kD;  // dq is contiguous
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  T* dq = static_cast<T*>(p.dq);
  const float scale_s = static_cast<float>(p.softmax_scale);
  const f32x8 scale = bcast8(scale_s);
  // [8 * j + lane]: P, dP then dS, and under dropout P * keep
  alignas(32) float probs[kBwdBlockMinKeys * 8], dscores[kBwdBlockMinKeys * 8], kept[kBwdBlockMinKeys * 8];
  const float* weights_dv = p.dropout_p > 0.0 ? kept : probs;
  LaneRows<T, kD> q_lane, do_lane;
  const float *k_lane[8], *v_lane[8];
  alignas(32) int32_t n_lane[8];
  alignas(32) float lse_lane[8];
  int64_t row[8], kv[8], rank[8];
  u32x8 heads, tokens;  // of the lanes, for the dropout mask
  PairBatches batches(lq, g1 - g0, group);
  while (const int lanes = batches.next(row, kv, rank)) {
    int64_t n_max = 0;
    for (int l = 0; l < 8; ++l) {
      const int64_t h = (g0 + kv[l]) * group + rank[l], t = q0 + row[l];
      heads[l] = static_cast<uint32_t>(h), tokens[l] = static_cast<uint32_t>(t);
      q_lane.set(l, q + t * p.q_row + h * p.q_head);
      do_lane.set(l, dout + t * p.dout_row + h * p.dout_head);
      k_lane[l] = keys.row(kv[l], 0);
      v_lane[l] = values.row(kv[l], 0);
      n_lane[l] = static_cast<int32_t>(visible_keys(row[l], lq, lk, p.causal));
      lse_lane[l] = p.lse[h * p.total_q + t];
      n_max = std::max<int64_t>(n_max, n_lane[l]);
    }
    const i32x8 n = *reinterpret_cast<const i32x8*>(n_lane);
    const f32x8 lse = load8(lse_lane);
    f32x8 delta{}, prob_sum{};  // the softmax Jacobian's correction, as in softmax_backward_row
    for (int64_t j = 0; j < n_max; ++j) {
      const f32x8 scores = dot8_lanes<kD>(q_lane.row, k_lane, j * keys.row_stride) * scale;
      f32x8 dp = dot8_lanes<kD>(do_lane.row, v_lane, j * values.row_stride);
      const auto visible = static_cast<int32_t>(j) < n;
      // Masked before exp: a lane without keys has lse = -inf, and exp(s - lse) would be inf.
      const f32x8 prob = exp8(visible ? scores - lse : f32x8{} - INFINITY);
      if (p.dropout_p > 0.0) {
        // The forward used P * keep for P @ V: dV takes P * keep, and dP reaches dS through the same mask.
        const i32x8 keep = dropout_keep8(p, heads, tokens, u32x8{} + static_cast<uint32_t>(k0 + j));
        const f32x8 factor = keep ? f32x8{} + static_cast<float>(p.dropout_scale) : f32x8{};
        store8(kept + 8 * j, prob * factor);
        dp *= factor;
      }
      store8(probs + 8 * j, prob);
      store8(dscores + 8 * j, dp);
      // Selected, not multiplied by the masked P = 0: an invisible value row may hold an inf.
      delta += visible ? prob * dp : f32x8{};
      prob_sum += prob;
    }
    // Lanes without keys have prob_sum = 0; they store nothing.
    delta = prob_sum > f32x8{} ? delta / prob_sum : f32x8{};
    for (int64_t j = 0; j < n_max; ++j)
      store8(dscores + 8 * j, load8(probs + 8 * j) * (load8(dscores + 8 * j) - delta));
    for (int l = 0; l < lanes; ++l) {
      const int64_t h = heads[l];
      const float* k_rows = k_lane[l];
      store_weighted_sum<T, kD>(dq + (q0 + row[l]) * q_stride + h * kD, dscores + l, 8, n_lane[l], scale_s,
                                [&](int64_t j) { return k_rows + j * keys.row_stride; });
      for (int64_t j = 0; j < n_lane[l]; ++j) {
        add_scaled<kD>(dk_acc.row(kv[l], j), scale_s * dscores[8 * j + l], q_lane.row[l]);
        add_scaled<kD>(dv_acc.row(kv[l], j), weights_dv[8 * j + l], do_lane.row[l]);
      }
    }
  }
}

// Blocked forward of query rows [i0, i0 + r) of head h (float, kD a multiple of 32), tokens token0 + b against
// keys key0 + j (key(j), val(j): rows of the tensors themselves): scores and softmax row by row, then P @ V two
// rows at a time so that each value row is loaded once per pair.
template <typename T, int kD, typename KeyFn, typename ValFn, typename OutFn>
inline void fwd_block(const AttentionParams& p, int64_t head, int64_t token0, int64_t key0, const T* const* q_rows,
                      int64_t r, const int64_t* n, float scale, float* scores, int64_t row_len, float* qrows,
                      float* lse_out[], OutFn&& out_row, KeyFn&& key, ValFn&& val) {
  float inv[kBlockRows];
  for (int64_t b = 0; b < r; ++b) {
    float* s = scores + b * row_len;
    if (n[b] == 0) {
      *lse_out[b] = -std::numeric_limits<float>::infinity();
      inv[b] = 0;
      continue;
    }
    float* qr = qrows + b * kD;
    load_row(qr, q_rows[b], kD, scale);
    const float row_max = scores8<kD>(s, qr, n[b], key);
    const float sum = exp_shifted(s, n[b], row_max);
    if (p.dropout_p > 0.0) apply_dropout(p, head, token0 + b, key0, n[b], s);
    inv[b] = 1.0f / sum;
    *lse_out[b] = row_max + std::log(sum);
  }
  alignas(64) float res[2][kD];
  for (int64_t b = 0; b < r; b += 2) {
    const int64_t b1 = b + 1 < r ? b + 1 : b;
    combine2<kD>(res[0], res[1], scores + b * row_len, scores + b1 * row_len, n[b], n[b1], val);
    for (int64_t e = b; e <= b1; ++e) {
      T* o = out_row(e);
      for (int64_t c = 0; c < kD; ++c) o[c] = static_cast<T>(res[e - b][c] * inv[e]);
    }
  }
}

// g_j[c] += sum_{b < r} w_b[j] * x_b[c] for keys j in [0, n): the rank-r update dk += dS^T (scale q) or
// dv += P^T dout of a chunk of query rows. Two keys x 32 columns of g stay in registers across all the rows,
// so g is loaded and stored once per chunk. w: r rows of row_len weights, read only where the row sees the
// key; x: r rows of kD. Only the rows that see a key add to it (n is nondecreasing, so those are the rows
// from some first one on): a row's x may hold an inf, and 0 * inf would be NaN.
template <int kD, typename GradFn>
inline void rank_update(const float* __restrict w, int64_t row_len, const float* __restrict x, int64_t r,
                        const int64_t* n, int64_t n_keys, GradFn&& grad) {
  int64_t first = 0, first1 = 0;  // the first rows that see keys j and j + 1
  for (int64_t j = 0; j < n_keys; j += 2) {
    while (first < r && n[first] <= j) ++first;
    const bool pair = j + 1 < n_keys;
    first1 = std::max(first1, first);
    while (first1 < r && n[first1] <= j + 1) ++first1;
    const int64_t both = pair ? first1 : r;  // rows from here on add to both keys
    float* g0 = grad(j);
    float* g1 = grad(pair ? j + 1 : j);
    for (int c0 = 0; c0 < kD; c0 += 32) {
      f32x8 a0[4], a1[4];
      for (int t = 0; t < 4; ++t) a0[t] = a1[t] = f32x8{};
      for (int64_t b = first; b < both; ++b) add_row32(a0, bcast8(w[b * row_len + j]), x + b * kD + c0);
      for (int64_t b = both; b < r; ++b) {
        const f32x8 w0 = bcast8(w[b * row_len + j]), w1 = bcast8(w[b * row_len + j + 1]);
        const float* xb = x + b * kD + c0;
        for (int t = 0; t < 4; ++t) {
          const f32x8 xv = load8(xb + 8 * t);
          a0[t] += w0 * xv;
          a1[t] += w1 * xv;
        }
      }
      for (int t = 0; t < 4; ++t) store8(g0 + c0 + 8 * t, load8(g0 + c0 + 8 * t) + a0[t]);
      if (pair)
        for (int t = 0; t < 4; ++t) store8(g1 + c0 + 8 * t, load8(g1 + c0 + 8 * t) + a1[t]);
    }
  }
}

// Blocked backward of query rows [i0, i0 + r) of head h (float, kD a multiple of 32, r <= kBwdRows), tokens
// token0 + b against keys key0 + j (key(j), val(j): rows of the tensors themselves). Row by row: P from the
// scores and lse, dP = dout . v, both score rows by scores8, then dS (softmax_backward_row, which applies
// dropout). Then the three products as register-tiled loops: dq = dS @ K two rows at a time (combine2),
// dk += dS^T (scale q) and dv += P^T dout two keys at a time over all r rows (rank_update).
template <typename T, int kD, typename KeyFn, typename ValFn, typename DkFn, typename DvFn>
inline void bwd_block(const AttentionParams& p, int64_t head, int64_t token0, int64_t key0, const T* const* q_rows,
                      const T* const* do_rows, const float* lse, int64_t r, const int64_t* n, float scale,
                      float* probs, float* dscores, float* factor, int64_t row_len, float* qrows, float* dorows,
                      T* const* dq_rows, KeyFn&& key, ValFn&& val, DkFn&& dk_row, DvFn&& dv_row) {
  int64_t n_max = 0;
  for (int64_t b = 0; b < r; ++b) {
    n_max = std::max(n_max, n[b]);
    if (n[b] == 0) continue;
    float* P = probs + b * row_len;
    float* dS = dscores + b * row_len;
    float* qr = qrows + b * kD;
    float* dor = dorows + b * kD;
    load_row(qr, q_rows[b], kD, scale);
    load_row(dor, do_rows[b], kD, 1.0f);
    scores8<kD>(P, qr, n[b], key);
    scores8<kD>(dS, dor, n[b], val);
    exp_shifted(P, n[b], lse[b]);
    softmax_backward_row(p, head, token0 + b, key0, n[b], P, dS, factor);
  }
  alignas(64) float res[2][kD];
  for (int64_t b = 0; b < r; b += 2) {
    const int64_t b1 = b + 1 < r ? b + 1 : b;
    combine2<kD>(res[0], res[1], dscores + b * row_len, dscores + b1 * row_len, n[b], n[b1], key);
    for (int64_t e = b; e <= b1; ++e)
      for (int64_t c = 0; c < kD; ++c) dq_rows[e][c] = static_cast<T>(scale * res[e - b][c]);
  }
  rank_update<kD>(dscores, row_len, qrows, r, n, n_max, dk_row);
  rank_update<kD>(probs, row_len, dorows, r, n, n_max, dv_row);
}

// Keys and values of one segment as stored: key(g, j) is key j of kv head g.
template <typename T>
struct SegmentRows {
  const T* k;
  const T* v;
  int64_t k_row, k_head, v_row, v_head;
  const T* key(int64_t g, int64_t j) const { return k + j * k_row + g * k_head; }
  const T* value(int64_t g, int64_t j) const { return v + j * v_row + g * v_head; }
};

// Bytes of converted keys and values one thread holds at most. A run of kv heads whose rows fit is converted to
// Acc once, and each converted row then feeds every query row of the run; a longer run is read in place and
// converted as it is read, so that scratch stays bounded however long the segment. That costs: measured on
// 1024-key segments, the blocked bfloat16 kernels (load8) take ~2x as long, the row kernels on float16 (a scalar
// conversion per element) ~10x.
constexpr int64_t kConvertBytes = 2 << 20;

// Calls body(key, value), key(g, j) and value(g, j) being the rows of kv heads g in [ga, gb): Acc rows converted
// into scratch when T is not Acc and they fit kConvertBytes, else the tensors' own rows.
template <typename A, typename T, typename Body>
inline void with_rows(const SegmentRows<T>& seg, int64_t lk, int64_t ga, int64_t gb, int64_t d,
                      Scratch<A>& scratch, Body&& body) {
  if constexpr (!std::is_same_v<T, A>) {
    const int64_t n = (gb - ga) * lk * d;  // per tensor
    if (2 * n * static_cast<int64_t>(sizeof(A)) <= kConvertBytes) {
      A* buf = scratch.converted(n);
      const auto keys = load_block(seg.key(ga, 0), seg.k_row, seg.k_head, lk, gb - ga, d, buf);
      const auto values = load_block(seg.value(ga, 0), seg.v_row, seg.v_head, lk, gb - ga, d, buf + n);
      body([&](int64_t g, int64_t j) { return keys.row(g - ga, j); },
           [&](int64_t g, int64_t j) { return values.row(g - ga, j); });
      return;
    }
  }
  body([&](int64_t g, int64_t j) { return seg.key(g, j); }, [&](int64_t g, int64_t j) { return seg.value(g, j); });
}

// kD: the head dim fixed at compile time (0: read from p), so that the loops over it unroll and the output
// accumulator lives in registers.
template <typename T, int kD>
void fwd_units(const AttentionParams& p, int64_t unit_begin, int64_t unit_end) {
  using A = typename AccOf<T>::type;
  const int64_t d = kD ? kD : p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int64_t seg_begin = unit_begin / p.num_kv_heads, seg_end = (unit_end - 1) / p.num_kv_heads + 1;
  Scratch<A> scratch(max_segment_len(p.cu_seqlens_q, seg_begin, seg_end),
                     max_segment_len(p.cu_seqlens_k, seg_begin, seg_end), d, false);
  const A scale = static_cast<A>(p.softmax_scale);
  const T* q = static_cast<const T*>(p.q);
  T* out = static_cast<T*>(p.out);

  for_each_segment_part(p, unit_begin, unit_end, [&](int64_t seg, int64_t g0, int64_t g1) {
    const int64_t q0 = p.cu_seqlens_q[seg], lq = p.cu_seqlens_q[seg + 1] - q0;
    const int64_t k0 = p.cu_seqlens_k[seg], lk = p.cu_seqlens_k[seg + 1] - k0;
    if (lq == 0) return;
    const SegmentRows<T> rows{static_cast<const T*>(p.k) + k0 * p.k_row, static_cast<const T*>(p.v) + k0 * p.v_row,
                              p.k_row, p.k_head, p.v_row, p.v_head};
    if constexpr (kBlocked<A, kD>) {
      if (lk < kFwdBlockMinKeys) {
        // Every query of a short segment uses every row of it: converted whatever the size (under 32 keys a head).
        constexpr bool kConvert = !std::is_same_v<T, A>;
        const int64_t n = lk * (g1 - g0) * d;
        A* buf = kConvert ? scratch.converted(n) : nullptr;
        const auto keys = load_block(rows.key(g0, 0), p.k_row, p.k_head, lk, g1 - g0, d, buf);
        const auto values = load_block(rows.value(g0, 0), p.v_row, p.v_head, lk, g1 - g0, d, kConvert ? buf + n : buf);
        fwd_short_segment<T, kD>(p, q0, lq, k0, lk, g0, g1, keys, values);
        return;
      }
      for (int64_t g = g0; g < g1; ++g) with_rows(rows, lk, g, g + 1, d, scratch, [&](auto&& key, auto&& value) {
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          if (h + 1 < g1 * group) {
            if ((h + 1) / group != g) {
              prefetch_rows(lk, kD * sizeof(T), [&](int64_t j) { return rows.key(g + 1, j); });
              prefetch_rows(lk, kD * sizeof(T), [&](int64_t j) { return rows.value(g + 1, j); });
            }
            prefetch_rows(lq, kD * sizeof(T), [&](int64_t i) { return q + (q0 + i) * p.q_row + (h + 1) * p.q_head; });
          }
          for (int64_t i0 = 0; i0 < lq; i0 += kBlockRows) {
            const int64_t r = std::min(kBlockRows, lq - i0);
            const T* q_rows[kBlockRows];
            int64_t n[kBlockRows];
            float* lse_out[kBlockRows];
            for (int64_t b = 0; b < r; ++b) {
              q_rows[b] = q + (q0 + i0 + b) * p.q_row + h * p.q_head;
              n[b] = visible_keys(i0 + b, lq, lk, p.causal);
              lse_out[b] = p.lse + h * p.total_q + q0 + i0 + b;
            }
            fwd_block<T, kD>(
                p, h, q0 + i0, k0, q_rows, r, n, scale, scratch.scores, scratch.row_len, scratch.qrow, lse_out,
                [&](int64_t b) { return out + (q0 + i0 + b) * p.out_row + h * p.out_head; },
                [&](int64_t j) { return key(g, j); }, [&](int64_t j) { return value(g, j); });
          }
        }
      });
    } else {
      auto row = [&](int64_t h, int64_t i, auto&& key, auto&& value) {
        T* o = out + (q0 + i) * p.out_row + h * p.out_head;
        float* lse = p.lse + h * p.total_q + q0 + i;
        const int64_t n = visible_keys(i, lq, lk, p.causal);
        if (n == 0) {
          for (int64_t c = 0; c < d; ++c) o[c] = T(0);
          *lse = -std::numeric_limits<float>::infinity();
          return;
        }
        const int64_t g = h / group;
        A* __restrict qr = scratch.qrow;
        A* __restrict s = scratch.scores;
        A* __restrict acc = scratch.acc;
        load_row(qr, q + (q0 + i) * p.q_row + h * p.q_head, d, scale);
        A row_max = -std::numeric_limits<A>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          s[j] = dot(qr, key(g, j), d);
          row_max = std::max(row_max, s[j]);
        }
        const A sum = exp_shifted(s, n, row_max);
        // Dropout scales the weights of P @ V, not the normaliser: sum and lse are the undropped softmax's.
        if (p.dropout_p > 0.0) apply_dropout(p, h, q0 + i, k0, n, s);
        for (int64_t c = 0; c < d; ++c) acc[c] = 0;
        for (int64_t j = 0; j < n; ++j) axpy(acc, s[j], value(g, j), d);
        const A inv = A(1) / sum;
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<T>(acc[c] * inv);
        *lse = static_cast<float>(row_max + std::log(sum));
      };
      // Token order takes all the segment's heads at once (it is small: token_order), head order one kv head at
      // a time.
      if (token_order(lk, p.num_heads, 2 * d * sizeof(A))) {
        with_rows(rows, lk, g0, g1, d, scratch, [&](auto&& key, auto&& value) {
          for_each_row(true, g0 * group, g1 * group, lq, [&](int64_t h, int64_t i) { row(h, i, key, value); });
        });
      } else {
        for (int64_t g = g0; g < g1; ++g) with_rows(rows, lk, g, g + 1, d, scratch, [&](auto&& key, auto&& value) {
          for_each_row(false, g * group, (g + 1) * group, lq, [&](int64_t h, int64_t i) { row(h, i, key, value); });
        });
      }
    }
  });
}

template <typename T, int kD>
void bwd_units(const AttentionParams& p, int64_t unit_begin, int64_t unit_end) {
  using A = typename AccOf<T>::type;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const int64_t d = kD ? kD : p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int64_t seg_begin = unit_begin / p.num_kv_heads, seg_end = (unit_end - 1) / p.num_kv_heads + 1;
  Scratch<A> scratch(max_segment_len(p.cu_seqlens_q, seg_begin, seg_end),
                     max_segment_len(p.cu_seqlens_k, seg_begin, seg_end), d, true);
  const A scale = static_cast<A>(p.softmax_scale);
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  const int64_t q_stride = p.num_heads * d, kv_stride = p.num_kv_heads * d;  // dq/dk/dv are contiguous

  for_each_segment_part(p, unit_begin, unit_end, [&](int64_t seg, int64_t g0, int64_t g1) {
    const int64_t q0 = p.cu_seqlens_q[seg], lq = p.cu_seqlens_q[seg + 1] - q0;
    const int64_t k0 = p.cu_seqlens_k[seg], lk = p.cu_seqlens_k[seg + 1] - k0;
    const SegmentRows<T> rows{static_cast<const T*>(p.k) + k0 * p.k_row, static_cast<const T*>(p.v) + k0 * p.v_row,
                              p.k_row, p.k_head, p.v_row, p.v_head};
    auto dk_out = [&](int64_t g, int64_t j) { return dk + (k0 + j) * kv_stride + g * d; };
    auto dv_out = [&](int64_t g, int64_t j) { return dv + (k0 + j) * kv_stride + g * d; };
    if (lq == 0) {
      for (int64_t g = g0; g < g1; ++g)
        for (int64_t j = 0; j < lk; ++j)
          for (int64_t c = 0; c < d; ++c) dk_out(g, j)[c] = dv_out(g, j)[c] = T(0);
      return;
    }
    // Runs body(dk_acc, dv_acc) with zeroed accumulators for the keys of kv heads [ga, gb) (row(g - ga, j)), then
    // stores them: straight in dk/dv when T is Acc, else in scratch (one run's worth: a long segment runs one kv
    // head at a time) converted once every row has added its terms. This call is their only writer (no atomics).
    auto accumulate = [&](int64_t ga, int64_t gb, auto&& body) {
      Block<A> dk_acc, dv_acc;
      if constexpr (kConvert) {
        A* buf = scratch.accumulators((gb - ga) * lk * d);
        dk_acc = {buf, d, lk * d};
        dv_acc = {buf + (gb - ga) * lk * d, d, lk * d};
      } else {
        dk_acc = {dk_out(ga, 0), kv_stride, d};
        dv_acc = {dv_out(ga, 0), kv_stride, d};
      }
      for (int64_t g = 0; g < gb - ga; ++g)
        for (int64_t j = 0; j < lk; ++j)
          for (int64_t c = 0; c < d; ++c) dk_acc.row(g, j)[c] = dv_acc.row(g, j)[c] = 0;
      body(dk_acc, dv_acc);
      if constexpr (kConvert) {
        for (int64_t g = ga; g < gb; ++g)
          for (int64_t j = 0; j < lk; ++j) {
            T* dk_row = dk_out(g, j);
            T* dv_row = dv_out(g, j);
            for (int64_t c = 0; c < d; ++c) {
              dk_row[c] = static_cast<T>(dk_acc.row(g - ga, j)[c]);
              dv_row[c] = static_cast<T>(dv_acc.row(g - ga, j)[c]);
            }
          }
      }
    };
    if constexpr (kBlocked<A, kD>) {
      if (lk < kBwdBlockMinKeys) {
        // Every query of a short segment uses every row of it: converted whatever the size (under 16 keys a head).
        const int64_t n = lk * (g1 - g0) * d;
        A* buf = kConvert ? scratch.converted(n) : nullptr;
        const auto keys = load_block(rows.key(g0, 0), p.k_row, p.k_head, lk, g1 - g0, d, buf);
        const auto values = load_block(rows.value(g0, 0), p.v_row, p.v_head, lk, g1 - g0, d, kConvert ? buf + n : buf);
        accumulate(g0, g1, [&](const Block<A>& dk_acc, const Block<A>& dv_acc) {
          bwd_short_segment<T, kD>(p, q0, lq, k0, lk, g0, g1, keys, values, dk_acc, dv_acc);
        });
        return;
      }
      for (int64_t g = g0; g < g1; ++g) accumulate(g, g + 1, [&](const Block<A>& dk_acc, const Block<A>& dv_acc) {
        with_rows(rows, lk, g, g + 1, d, scratch, [&](auto&& key, auto&& value) {
          for (int64_t h = g * group; h < (g + 1) * group; ++h) {
            for (int64_t i0 = 0; i0 < lq; i0 += kBwdRows) {
              const int64_t r = std::min(kBwdRows, lq - i0);
              const T *q_rows[kBwdRows], *do_rows[kBwdRows];
              T* dq_rows[kBwdRows];
              int64_t n[kBwdRows];
              float lse[kBwdRows];
              for (int64_t b = 0; b < r; ++b) {
                const int64_t t = q0 + i0 + b;
                q_rows[b] = q + t * p.q_row + h * p.q_head;
                do_rows[b] = dout + t * p.dout_row + h * p.dout_head;
                dq_rows[b] = dq + t * q_stride + h * d;
                n[b] = visible_keys(i0 + b, lq, lk, p.causal);
                lse[b] = p.lse[h * p.total_q + t];
              }
              bwd_block<T, kD>(p, h, q0 + i0, k0, q_rows, do_rows, lse, r, n, scale, scratch.probs,
                               scratch.scores, scratch.factor, scratch.row_len, scratch.qrow, scratch.dorow,
                               dq_rows, [&](int64_t j) { return key(g, j); }, [&](int64_t j) { return value(g, j); },
                               [&](int64_t j) { return dk_acc.row(0, j); },
                               [&](int64_t j) { return dv_acc.row(0, j); });
            }
          }
        });
      });
    } else {
      // One query row (h, i) at a time; ga is the first kv head of the accumulators' run.
      auto row = [&](int64_t h, int64_t i, auto&& key, auto&& value, int64_t ga, const Block<A>& dk_acc,
                     const Block<A>& dv_acc) {
        T* dq_row = dq + (q0 + i) * q_stride + h * d;
        const int64_t n = visible_keys(i, lq, lk, p.causal);
        if (n == 0) {
          for (int64_t c = 0; c < d; ++c) dq_row[c] = T(0);
          return;
        }
        const int64_t g = h / group;
        A* __restrict qr = scratch.qrow;
        A* __restrict dor = scratch.dorow;
        A* __restrict s = scratch.scores;
        A* __restrict dp = scratch.probs;
        alignas(64) A acc_regs[kD ? kD : 1];
        A* __restrict acc = kD ? acc_regs : scratch.acc;
        load_row(qr, q + (q0 + i) * p.q_row + h * p.q_head, d, A(1));
        load_row(dor, dout + (q0 + i) * p.dout_row + h * p.dout_head, d, A(1));
        for (int64_t j = 0; j < n; ++j) {
          s[j] = scale * dot(qr, key(g, j), d);
          dp[j] = dot(dor, value(g, j), d);
        }
        if constexpr (std::is_same_v<A, double>) {
          // lse is float32: renormalise in double so float64 gradients keep float64 accuracy.
          A row_max = -std::numeric_limits<A>::infinity();
          for (int64_t j = 0; j < n; ++j) row_max = std::max(row_max, s[j]);
          const A sum = exp_shifted(s, n, row_max);
          for (int64_t j = 0; j < n; ++j) s[j] /= sum;
        } else {
          exp_shifted(s, n, static_cast<A>(p.lse[h * p.total_q + q0 + i]));
        }
        for (int64_t c = 0; c < d; ++c) acc[c] = 0;
        softmax_backward_row(p, h, q0 + i, k0, n, s, dp, scratch.factor);  // dp <- dS, s <- the weights dV sees
        for (int64_t j = 0; j < n; ++j) {
          axpy(acc, dp[j], key(g, j), d);
          axpy(dk_acc.row(g - ga, j), scale * dp[j], qr, d);
          axpy(dv_acc.row(g - ga, j), s[j], dor, d);
        }
        for (int64_t c = 0; c < d; ++c) dq_row[c] = static_cast<T>(scale * acc[c]);
      };
      // Token order takes all the segment's heads at once (it is small: token_order), head order one kv head at
      // a time, so that the accumulators hold one head's keys.
      if (token_order(lk, p.num_heads, 4 * d * sizeof(A))) {
        accumulate(g0, g1, [&](const Block<A>& dk_acc, const Block<A>& dv_acc) {
          with_rows(rows, lk, g0, g1, d, scratch, [&](auto&& key, auto&& value) {
            for_each_row(true, g0 * group, g1 * group, lq, [&](int64_t h, int64_t i) {
              row(h, i, key, value, g0, dk_acc, dv_acc);
            });
          });
        });
      } else {
        for (int64_t g = g0; g < g1; ++g) accumulate(g, g + 1, [&](const Block<A>& dk_acc, const Block<A>& dv_acc) {
          with_rows(rows, lk, g, g + 1, d, scratch, [&](auto&& key, auto&& value) {
            for_each_row(false, g * group, (g + 1) * group, lq, [&](int64_t h, int64_t i) {
              row(h, i, key, value, g, dk_acc, dv_acc);
            });
          });
        });
      }
    }
  });
}

// Head dims with an unrolled kernel; others take the generic one.
template <typename T, template <typename, int> class Kernel>
void by_head_dim(const AttentionParams& p, int64_t unit_begin, int64_t unit_end) {
  switch (p.head_dim) {
    case 32: return Kernel<T, 32>::run(p, unit_begin, unit_end);
    case 64: return Kernel<T, 64>::run(p, unit_begin, unit_end);
    case 128: return Kernel<T, 128>::run(p, unit_begin, unit_end);
    default: return Kernel<T, 0>::run(p, unit_begin, unit_end);
  }
}

template <typename T, int kD> struct Fwd { static void run(const AttentionParams& p, int64_t b, int64_t e) { fwd_units<T, kD>(p, b, e); } };
template <typename T, int kD> struct Bwd { static void run(const AttentionParams& p, int64_t b, int64_t e) { bwd_units<T, kD>(p, b, e); } };

template <template <typename, int> class Kernel>
void by_dtype(const AttentionParams& p, int64_t unit_begin, int64_t unit_end) {
  if (unit_begin >= unit_end) return;
  switch (p.kind) {
    case ScalarKind::kFloat: return by_head_dim<float, Kernel>(p, unit_begin, unit_end);
    case ScalarKind::kDouble: return by_head_dim<double, Kernel>(p, unit_begin, unit_end);
    case ScalarKind::kBFloat16: return by_head_dim<c10::BFloat16, Kernel>(p, unit_begin, unit_end);
    case ScalarKind::kHalf: return by_head_dim<c10::Half, Kernel>(p, unit_begin, unit_end);
  }
}

void varlen_fwd_units(const AttentionParams& p, int64_t unit_begin, int64_t unit_end) {
  by_dtype<Fwd>(p, unit_begin, unit_end);
}

void varlen_bwd_units(const AttentionParams& p, int64_t unit_begin, int64_t unit_end) {
  by_dtype<Bwd>(p, unit_begin, unit_end);
}
