// Register-tiled micro-kernels: weighted sums of rows (P @ V, dS @ K) with the accumulators in
// registers, prefetching, and the rank updates of dk/dv.
// Part of the CPU kernels' single source (attention_kernel_impl.h includes the parts in order): not a normal
// header. Compiled once per instruction set inside `namespace hierkern::cpu::<isa>`, it may only use what
// kernel_common.h included, and what the parts before it define.

// acc[t] += w * x[8t .. 8t + 8) for t < 4: 32 columns of one weighted row (floats, bfloat16 or float16).
template <typename E>
__attribute__((always_inline)) inline void add_row32(f32x8* acc, f32x8 w, const E* x) {
  for (int t = 0; t < 4; ++t) acc[t] += w * load8(x + 8 * t);
}

// res_r[c] = sum_{j in k_r} w_r[j - k_r.lo] * row(j)[c] for two weight rows at once, k0 and k1 being two rows'
// key ranges (visible_keys of rows in order: k0.lo <= k1.lo and k0.hi <= k1.hi): each row chunk that both see
// feeds both, and the sums stay in registers (32 columns x 2 rows = 8 vectors) instead of a memory accumulator
// whose store-to-load latency would serialise the key loop. Keys only one row sees go to that row alone: the
// rows the other does not see may hold an inf, and 0 * inf would be NaN.
template <int kD, typename RowFn>
inline void combine2(float* __restrict res0, float* __restrict res1, const float* __restrict w0,
                     const float* __restrict w1, KeyRange k0, KeyRange k1, RowFn&& row) {
  w0 -= k0.lo, w1 -= k1.lo;                                                      // indexed by key from here on
  const int64_t only0 = std::min(k1.lo, k0.hi), only1 = std::max(k0.hi, k1.lo);  // keys [k1.lo, k0.hi): both
  for (int c0 = 0; c0 < kD; c0 += 32) {
    f32x8 a0[4] = {}, a1[4] = {};
    for (int64_t j = k0.lo; j < only0; ++j) add_row32(a0, bcast8(w0[j]), row(j) + c0);
    for (int64_t j = k1.lo; j < k0.hi; ++j) {
      const auto* x = row(j) + c0;
      const f32x8 b0 = bcast8(w0[j]), b1 = bcast8(w1[j]);
      for (int t = 0; t < 4; ++t) {
        const f32x8 xv = load8(x + 8 * t);
        a0[t] += b0 * xv;
        a1[t] += b1 * xv;
      }
    }
    for (int64_t j = only1; j < k1.hi; ++j) add_row32(a1, bcast8(w1[j]), row(j) + c0);
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

// g_j[c] += sum_{b < r} w_b[j] * x_b[c] for the keys j the rows see: the rank-r update dk += dS^T (scale q) or
// dv += P^T dout of a chunk of query rows. Two keys x 32 columns of g stay in registers across all the rows,
// so g is loaded and stored once per chunk. w: r rows of row_len weights (r <= kBwdRows), row b's from its first
// key range[b].lo on; x: r rows of kD. Only the rows that see a key add to it (ranges are nondecreasing at both
// ends, so those are consecutive rows): a row's x may hold an inf, and 0 * inf would be NaN.
template <int kD, typename GradFn>
inline void rank_update(const float* __restrict w, int64_t row_len, const float* __restrict x, int64_t r,
                        const KeyRange* range, GradFn&& grad) {
  const int64_t key_end = range[r - 1].hi;
  const float* row_w[kBwdRows];  // indexed by key
  for (int64_t b = 0; b < r; ++b) row_w[b] = w + b * row_len - range[b].lo;
  // Rows [first, end) see key j, rows [first1, end1) key j + 1.
  int64_t first = 0, end = 0, first1 = 0, end1 = 0;
  for (int64_t j = range[0].lo; j < key_end; j += 2) {
    const bool pair = j + 1 < key_end;
    while (first < r && range[first].hi <= j) ++first;
    while (end < r && range[end].lo <= j) ++end;
    first1 = std::max(first1, first), end1 = std::max(end1, end);
    while (first1 < r && range[first1].hi <= j + 1) ++first1;
    while (end1 < r && range[end1].lo <= j + 1) ++end1;
    if (!pair) first1 = end1 = end;
    // Rows [first, only0) add to key j alone, [first1, end) to both, [only1, end1) to key j + 1 alone.
    const int64_t only0 = std::min(first1, end), only1 = std::max(first1, end);
    float* g0 = grad(j);
    float* g1 = grad(pair ? j + 1 : j);
    for (int c0 = 0; c0 < kD; c0 += 32) {
      f32x8 a0[4], a1[4];
      for (int t = 0; t < 4; ++t) a0[t] = a1[t] = f32x8{};
      for (int64_t b = first; b < only0; ++b) add_row32(a0, bcast8(row_w[b][j]), x + b * kD + c0);
      for (int64_t b = first1; b < end; ++b) {
        const f32x8 w0 = bcast8(row_w[b][j]), w1 = bcast8(row_w[b][j + 1]);
        const float* xb = x + b * kD + c0;
        for (int t = 0; t < 4; ++t) {
          const f32x8 xv = load8(xb + 8 * t);
          a0[t] += w0 * xv;
          a1[t] += w1 * xv;
        }
      }
      for (int64_t b = only1; b < end1; ++b) add_row32(a1, bcast8(row_w[b][j + 1]), x + b * kD + c0);
      for (int t = 0; t < 4; ++t) store8(g0 + c0 + 8 * t, load8(g0 + c0 + 8 * t) + a0[t]);
      if (pair)
        for (int t = 0; t < 4; ++t) store8(g1 + c0 + 8 * t, load8(g1 + c0 + 8 * t) + a1[t]);
    }
  }
}
