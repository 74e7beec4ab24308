// The dropout RNG in eight lanes: common/philox.h's Philox4x32-10 and counter layout, vectorised, and
// the per-row factors the kernels multiply by.
// Part of the CPU kernels' single source (attention_kernel_impl.h includes the parts in order): not a normal
// header. Compiled once per instruction set inside `namespace hierkern::cpu::<isa>`, it may only use what
// kernel_common.h included, and what the parts before it define.

// The high and low 32 bits of m * x in each of 8 lanes. Generic vectors would make GCC emulate full 64-bit
// products (three multiplies each); x86's 32x32->64-bit multiply takes the even lanes and, after a 32-bit
// shift, the odd ones.
inline void mulhilo8(uint32_t m, u32x8 x, u32x8& hi, u32x8& lo) {
  u32x8 even, odd;                // [lo, hi] of the products of lanes (0, 2, 4, 6) and (1, 3, 5, 7)
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

// common/philox.h's philox4x32_10 on eight counters at once, in place: (c0, c1, c2, c3) become the output words.
inline void philox8(u32x8& c0, u32x8& c1, u32x8& c2, u32x8& c3, PhiloxKey key) {
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    u32x8 hi0, lo0, hi1, lo1;
    mulhilo8(kPhiloxM0, c0, hi0, lo0);
    mulhilo8(kPhiloxM1, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Whether dropout keeps each of eight attention weights (head[l], query[l], key[l]) (query and key as packed
// token indices): common/philox.h's dropout_keep (Philox4x32-10, the same counter and key) in eight lanes at once,
// since one scalar draw costs about as much as a short row's softmax. -1 where kept, 0 where dropped.
inline i32x8 dropout_keep8(const AttentionParams& p, u32x8 head, u32x8 query, u32x8 key) {
  u32x8 c0 = query, c1 = key, c2 = head, c3 = u32x8{} + static_cast<uint32_t>(p.dropout_offset);
  philox8(c0, c1, c2, c3, dropout_key(p.dropout_seed, p.dropout_offset));
  return c0 >= p.dropout_threshold;
}

// Dropout's factors, in precision A, for the weights of one query row (head, query) against keys key0 + j,
// j < n (n <= 8): 1 / (1 - dropout_p) where kept, else 0.
template <typename A>
inline void dropout_factors(const AttentionParams& p, int64_t head, int64_t query, int64_t key0, int64_t n, A* factor) {
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
