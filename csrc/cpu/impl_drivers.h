// The drivers: per thread's range of (segment, kv-head) units, choose the kernel strategy for each
// segment (short-segment lanes, blocked, or the row-at-a-time path for double and other head
// dims), and dispatch on dtype and head dim.
// Part of the CPU kernels' single source (attention_kernel_impl.h includes the parts in order): not a normal
// header. Compiled once per instruction set inside `namespace hierkern::cpu::<isa>`, it may only use what
// kernel_common.h included, and what the parts before it define.

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
inline void with_rows(const SegmentRows<T>& seg, int64_t lk, int64_t ga, int64_t gb, int64_t d, Scratch<A>& scratch,
                      Body&& body) {
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
    const SegmentRows<T> rows{static_cast<const T*>(p.k) + k0 * p.k_row,
                              static_cast<const T*>(p.v) + k0 * p.v_row,
                              p.k_row,
                              p.k_head,
                              p.v_row,
                              p.v_head};
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
      for (int64_t g = g0; g < g1; ++g)
        with_rows(rows, lk, g, g + 1, d, scratch, [&](auto&& key, auto&& value) {
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
              KeyRange range[kBlockRows];
              float* lse_out[kBlockRows];
              for (int64_t b = 0; b < r; ++b) {
                q_rows[b] = q + (q0 + i0 + b) * p.q_row + h * p.q_head;
                range[b] = visible_keys(p, i0 + b, lq, lk);
                lse_out[b] = p.lse + h * p.total_q + q0 + i0 + b;
              }
              fwd_block<T, kD>(
                  p, h, q0 + i0, k0, q_rows, r, range, scale, scratch.scores, scratch.row_len, scratch.qrow, lse_out,
                  [&](int64_t b) { return out + (q0 + i0 + b) * p.out_row + h * p.out_head; },
                  [&](int64_t j) { return key(g, j); }, [&](int64_t j) { return value(g, j); });
            }
          }
        });
    } else {
      auto row = [&](int64_t h, int64_t i, auto&& key, auto&& value) {
        T* o = out + (q0 + i) * p.out_row + h * p.out_head;
        float* lse = p.lse + h * p.total_q + q0 + i;
        const KeyRange range = visible_keys(p, i, lq, lk);
        const int64_t lo = range.lo, n = range.size();
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
          s[j] = dot(qr, key(g, lo + j), d);
          row_max = std::max(row_max, s[j]);
        }
        const A sum = exp_shifted(s, n, row_max);
        // Dropout scales the weights of P @ V, not the normaliser: sum and lse are the undropped softmax's.
        if (p.dropout_p > 0.0) apply_dropout(p, h, q0 + i, k0 + lo, n, s);
        for (int64_t c = 0; c < d; ++c) acc[c] = 0;
        for (int64_t j = 0; j < n; ++j) axpy(acc, s[j], value(g, lo + j), d);
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
        for (int64_t g = g0; g < g1; ++g)
          with_rows(rows, lk, g, g + 1, d, scratch, [&](auto&& key, auto&& value) {
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
    const SegmentRows<T> rows{static_cast<const T*>(p.k) + k0 * p.k_row,
                              static_cast<const T*>(p.v) + k0 * p.v_row,
                              p.k_row,
                              p.k_head,
                              p.v_row,
                              p.v_head};
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
      for (int64_t g = g0; g < g1; ++g)
        accumulate(g, g + 1, [&](const Block<A>& dk_acc, const Block<A>& dv_acc) {
          with_rows(rows, lk, g, g + 1, d, scratch, [&](auto&& key, auto&& value) {
            for (int64_t h = g * group; h < (g + 1) * group; ++h) {
              for (int64_t i0 = 0; i0 < lq; i0 += kBwdRows) {
                const int64_t r = std::min(kBwdRows, lq - i0);
                const T *q_rows[kBwdRows], *do_rows[kBwdRows];
                T* dq_rows[kBwdRows];
                KeyRange range[kBwdRows];
                float lse[kBwdRows];
                for (int64_t b = 0; b < r; ++b) {
                  const int64_t t = q0 + i0 + b;
                  q_rows[b] = q + t * p.q_row + h * p.q_head;
                  do_rows[b] = dout + t * p.dout_row + h * p.dout_head;
                  dq_rows[b] = dq + t * q_stride + h * d;
                  range[b] = visible_keys(p, i0 + b, lq, lk);
                  lse[b] = p.lse[h * p.total_q + t];
                }
                bwd_block<T, kD>(
                    p, h, q0 + i0, k0, q_rows, do_rows, lse, r, range, scale, scratch.probs, scratch.scores,
                    scratch.factor, scratch.row_len, scratch.qrow, scratch.dorow, dq_rows,
                    [&](int64_t j) { return key(g, j); }, [&](int64_t j) { return value(g, j); },
                    [&](int64_t j) { return dk_acc.row(0, j); }, [&](int64_t j) { return dv_acc.row(0, j); });
              }
            }
          });
        });
    } else {
      // One query row (h, i) at a time; ga is the first kv head of the accumulators' run.
      auto row = [&](int64_t h, int64_t i, auto&& key, auto&& value, int64_t ga, const Block<A>& dk_acc,
                     const Block<A>& dv_acc) {
        T* dq_row = dq + (q0 + i) * q_stride + h * d;
        const KeyRange range = visible_keys(p, i, lq, lk);
        const int64_t lo = range.lo, n = range.size();
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
          s[j] = scale * dot(qr, key(g, lo + j), d);
          dp[j] = dot(dor, value(g, lo + j), d);
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
        softmax_backward_row(p, h, q0 + i, k0 + lo, n, s, dp, scratch.factor);  // dp <- dS, s <- dV's weights
        for (int64_t j = 0; j < n; ++j) {
          axpy(acc, dp[j], key(g, lo + j), d);
          axpy(dk_acc.row(g - ga, lo + j), scale * dp[j], qr, d);
          axpy(dv_acc.row(g - ga, lo + j), s[j], dor, d);
        }
        for (int64_t c = 0; c < d; ++c) dq_row[c] = static_cast<T>(scale * acc[c]);
      };
      // Token order takes all the segment's heads at once (it is small: token_order), head order one kv head at
      // a time, so that the accumulators hold one head's keys.
      if (token_order(lk, p.num_heads, 4 * d * sizeof(A))) {
        accumulate(g0, g1, [&](const Block<A>& dk_acc, const Block<A>& dv_acc) {
          with_rows(rows, lk, g0, g1, d, scratch, [&](auto&& key, auto&& value) {
            for_each_row(true, g0 * group, g1 * group, lq,
                         [&](int64_t h, int64_t i) { row(h, i, key, value, g0, dk_acc, dv_acc); });
          });
        });
      } else {
        for (int64_t g = g0; g < g1; ++g)
          accumulate(g, g + 1, [&](const Block<A>& dk_acc, const Block<A>& dv_acc) {
            with_rows(rows, lk, g, g + 1, d, scratch, [&](auto&& key, auto&& value) {
              for_each_row(false, g * group, (g + 1) * group, lq,
                           [&](int64_t h, int64_t i) { row(h, i, key, value, g, dk_acc, dv_acc); });
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
    case 32:
      return Kernel<T, 32>::run(p, unit_begin, unit_end);
    case 64:
      return Kernel<T, 64>::run(p, unit_begin, unit_end);
    case 128:
      return Kernel<T, 128>::run(p, unit_begin, unit_end);
    default:
      return Kernel<T, 0>::run(p, unit_begin, unit_end);
  }
}

template <typename T, int kD>
struct Fwd {
  static void run(const AttentionParams& p, int64_t b, int64_t e) { fwd_units<T, kD>(p, b, e); }
};
template <typename T, int kD>
struct Bwd {
  static void run(const AttentionParams& p, int64_t b, int64_t e) { bwd_units<T, kD>(p, b, e); }
};

template <template <typename, int> class Kernel>
void by_dtype(const AttentionParams& p, int64_t unit_begin, int64_t unit_end) {
  if (unit_begin >= unit_end) return;
  switch (p.kind) {
    case ScalarKind::kFloat:
      return by_head_dim<float, Kernel>(p, unit_begin, unit_end);
    case ScalarKind::kDouble:
      return by_head_dim<double, Kernel>(p, unit_begin, unit_end);
    case ScalarKind::kBFloat16:
      return by_head_dim<c10::BFloat16, Kernel>(p, unit_begin, unit_end);
    case ScalarKind::kHalf:
      return by_head_dim<c10::Half, Kernel>(p, unit_begin, unit_end);
  }
}

void varlen_fwd_units(const AttentionParams& p, int64_t unit_begin, int64_t unit_end) {
  by_dtype<Fwd>(p, unit_begin, unit_end);
}

void varlen_bwd_units(const AttentionParams& p, int64_t unit_begin, int64_t unit_end) {
  by_dtype<Bwd>(p, unit_begin, unit_end);
}
