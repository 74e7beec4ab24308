// The element-wise dropout kernels. Not a normal header: dropout_<isa>.cpp includes it once inside
// `namespace hierkern::cpu::<isa>` after choosing the code-generation target and after the attention
// kernels' impl_vector.h and impl_dropout.h (the 8-lane vectors, their bfloat16/float16 loads and the
// 8-lane Philox rounds), which it reuses.
//
// A chunk of 32 elements costs one 8-lane Philox4x32-10 call: its four output words, each eight lanes wide,
// decide elements 0-7, 8-15, 16-23 and 24-31 of the chunk (common/philox.h's element layout), so the keep
// masks line up with contiguous vector loads and no lane shuffling is needed. The factor (scale or 0) is
// selected, then multiplied: a dropped NaN stays NaN, as in torch's x * mask / (1 - p).

// Keep masks (-1 kept, 0 dropped) of the 32 elements of chunk c: keep[w] lane l is element 32c + 8w + l.
inline void chunk_keep(const DropoutParams& p, uint64_t chunk, i32x8 keep[4]) {
  const u32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const uint64_t block0 = chunk * 8;  // a multiple of 8: adding a lane never carries into the high word
  u32x8 c0 = lane + static_cast<uint32_t>(block0);
  u32x8 c1 = u32x8{} + static_cast<uint32_t>(block0 >> 32);
  u32x8 c2 = u32x8{} + kElementDropoutTag;
  u32x8 c3 = u32x8{} + static_cast<uint32_t>(p.offset);
  philox8(c0, c1, c2, c3, dropout_key(p.seed, p.offset));
  keep[0] = c0 >= p.threshold;
  keep[1] = c1 >= p.threshold;
  keep[2] = c2 >= p.threshold;
  keep[3] = c3 >= p.threshold;
}

// Eight floats to bfloat16, rounding to nearest even (c10::BFloat16's rule, NaN to 0x7FC0), in vector code.
inline void store8(c10::BFloat16* out, f32x8 v) {
  const u32x8 bits = (u32x8)v;
  const u32x8 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const u32x8 result = v != v ? u32x8{} + 0x7FC0u : rounded;
  const u16x8 halves = __builtin_convertvector(result, u16x8);
  std::memcpy(out, &halves, sizeof halves);
}

inline void store8(c10::Half* out, f32x8 v) {
#if defined(HIERKERN_AVX2_BUILT)  // dropout_avx2.cpp, compiled with F16C
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int l = 0; l < 8; ++l) out[l] = c10::Half(v[l]);
#endif
}

// One chunk of 32 elements of float, bfloat16 or float16, computed in float and rounded once.
template <typename T, bool kResidual>
inline void chunk32(const i32x8 keep[4], f32x8 scale, const T* x, const T* residual, T* out) {
  for (int w = 0; w < 4; ++w) {
    const f32x8 factor = float_of(keep[w] & bits_of(scale));
    f32x8 y = load8(x + 8 * w) * factor;
    if (kResidual) y = load8(residual + 8 * w) + y;
    store8(out + 8 * w, y);
  }
}

typedef double f64x4 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));
typedef double f64x4_unaligned __attribute__((vector_size(32), aligned(8)));

template <bool kResidual>
inline void chunk32(const i32x8 keep[4], double scale, const double* x, const double* residual, double* out) {
  const i64x4 scale_bits = (i64x4)(f64x4{} + scale);
  for (int w = 0; w < 4; ++w) {
    const i64x4 halves[2] = {__builtin_convertvector(__builtin_shufflevector(keep[w], keep[w], 0, 1, 2, 3), i64x4),
                             __builtin_convertvector(__builtin_shufflevector(keep[w], keep[w], 4, 5, 6, 7), i64x4)};
    for (int h = 0; h < 2; ++h) {
      const int64_t at = 8 * w + 4 * h;
      f64x4 y = *reinterpret_cast<const f64x4_unaligned*>(x + at) * (f64x4)(halves[h] & scale_bits);
      if (kResidual) y = *reinterpret_cast<const f64x4_unaligned*>(residual + at) + y;
      *reinterpret_cast<f64x4_unaligned*>(out + at) = y;
    }
  }
}

template <typename T, bool kResidual>
void dropout_chunks_typed(const DropoutParams& p, int64_t chunk_begin, int64_t chunk_end) {
  using Scale = std::conditional_t<std::is_same<T, double>::value, double, f32x8>;
  Scale scale;
  if constexpr (std::is_same<T, double>::value)
    scale = p.scale;
  else
    scale = bcast8(static_cast<float>(p.scale));
  const T* x = static_cast<const T*>(p.x);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  i32x8 keep[4];
  const int64_t whole = p.numel / kDropoutChunk;
  for (int64_t c = chunk_begin; c < std::min(chunk_end, whole); ++c) {
    chunk_keep(p, static_cast<uint64_t>(c), keep);
    const int64_t at = c * kDropoutChunk;
    const T* r = kResidual ? residual + at : nullptr;
    if constexpr (std::is_same<T, double>::value) {
      chunk32<kResidual>(keep, scale, x + at, r, out + at);
    } else {
      chunk32<T, kResidual>(keep, scale, x + at, r, out + at);
    }
  }
  if (chunk_end > whole) {
    // The partial last chunk goes through zero-padded copies, so the vector code never reads past the end.
    const int64_t at = whole * kDropoutChunk, n = p.numel - at;
    T x_tail[kDropoutChunk] = {}, r_tail[kDropoutChunk] = {}, out_tail[kDropoutChunk];
    std::copy(x + at, x + at + n, x_tail);
    if (kResidual) std::copy(residual + at, residual + at + n, r_tail);
    chunk_keep(p, static_cast<uint64_t>(whole), keep);
    if constexpr (std::is_same<T, double>::value) {
      chunk32<kResidual>(keep, scale, x_tail, r_tail, out_tail);
    } else {
      chunk32<T, kResidual>(keep, scale, x_tail, r_tail, out_tail);
    }
    std::copy(out_tail, out_tail + n, out + at);
  }
}

template <typename T>
void dropout_chunks_of(const DropoutParams& p, int64_t chunk_begin, int64_t chunk_end) {
  if (p.residual != nullptr) {
    dropout_chunks_typed<T, true>(p, chunk_begin, chunk_end);
  } else {
    dropout_chunks_typed<T, false>(p, chunk_begin, chunk_end);
  }
}

void dropout_chunks(const DropoutParams& p, int64_t chunk_begin, int64_t chunk_end) {
  switch (p.kind) {
    case ScalarKind::kFloat:
      return dropout_chunks_of<float>(p, chunk_begin, chunk_end);
    case ScalarKind::kDouble:
      return dropout_chunks_of<double>(p, chunk_begin, chunk_end);
    case ScalarKind::kBFloat16:
      return dropout_chunks_of<c10::BFloat16>(p, chunk_begin, chunk_end);
    case ScalarKind::kHalf:
      return dropout_chunks_of<c10::Half>(p, chunk_begin, chunk_end);
  }
}
