// Row and softmax helpers shared by every kernel strategy: the softmax backward
// of one row, converted key/value blocks, the strategy thresholds, per-thread scratch and the
// iteration over a thread's units and rows.
// Part of the CPU kernels' single source (attention_kernel_impl.h includes the parts in order): not a normal
// header. Compiled once per instruction set inside `namespace hierkern::cpu::<isa>`, it may only use what
// kernel_common.h included, and what the parts before it define.

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
    for (int64_t j0 = 0; j0 < n; j0 += 8)
      dropout_factors(p, head, query, key0 + j0, std::min<int64_t>(8, n - j0), factor + j0);
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
Block<const A> load_block(const T* src, int64_t row_stride, int64_t head_stride, int64_t rows, int64_t heads, int64_t d,
                          A* scratch) {
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
    scores = p;
    p += rows * row_len;
    probs = backward ? p : nullptr;
    p += backward ? rows * row_len : 0;
    factor = backward ? p : nullptr;
    p += backward ? row_len : 0;
    qrow = p;
    p += rows * d;
    dorow = backward ? p : nullptr;
    p += backward ? rows * d : 0;
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
