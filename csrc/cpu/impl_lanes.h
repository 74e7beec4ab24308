// The short-segment kernels: eight (query row, head) pairs side by side, one per vector lane, for
// segments shorter than kFwdBlockMinKeys (forward) or kBwdBlockMinKeys (backward) keys.
// Part of the CPU kernels' single source (attention_kernel_impl.h includes the parts in order): not a normal
// header. Compiled once per instruction set inside `namespace hierkern::cpu::<isa>`, it may only use what
// kernel_common.h included, and what the parts before it define.

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

// The key ranges of eight lanes (visible_keys of their rows) as vectors, and the keys [begin, end) any lane with
// keys sees: the lanes' loops run over those, each lane's keys selected by `visible`. Computed lane-parallel:
// eight scalar visible_keys cost a tenth of a word's whole softmax.
struct LaneRanges {
  i32x8 lo, hi;
  int64_t begin, end;
  void set(const AttentionParams& p, const int64_t* row, int64_t lq, int64_t lk) {
    const i32x8 none{}, all = none + static_cast<int32_t>(lk);
    auto clamp = [&](i32x8 x) {
      const i32x8 y = x < none ? none : x;
      return y > all ? all : y;
    };
    i32x8 diag;
    for (int l = 0; l < 8; ++l) diag[l] = static_cast<int32_t>(row[l] + lk - lq);
    // Windows wider than lq + lk see what an unbounded side does; capped so that the sums stay in int32.
    hi = p.window_right < 0 ? all : clamp(diag + static_cast<int32_t>(std::min(p.window_right, lq + lk) + 1));
    lo = p.window_left < 0 ? none : clamp(diag - static_cast<int32_t>(std::min(p.window_left, lq + lk)));
    lo = lo < hi ? lo : hi;
    const i32x8 first = hi > lo ? lo : all, last = hi > lo ? hi : none;
    begin = lk, end = 0;
    for (int l = 0; l < 8; ++l) begin = std::min<int64_t>(begin, first[l]), end = std::max<int64_t>(end, last[l]);
  }
  int64_t size(int l) const { return hi[l] - lo[l]; }
  i32x8 count() const { return hi - lo; }
  i32x8 visible(int64_t j) const {
    const i32x8 jv = i32x8{} + static_cast<int32_t>(j);
    return (jv >= lo) & (jv < hi);
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
void fwd_short_segment(const AttentionParams& p, int64_t q0, int64_t lq, int64_t k0, int64_t lk, int64_t g0, int64_t g1,
                       const Block<const A>& keys, const Block<const A>& values) {
  static_assert(std::is_same_v<A, float> && kD > 0 && kD % 8 == 0, "fwd_short_segment is the float kernel");
  const int64_t group = p.num_heads / p.num_kv_heads;
  const T* q = static_cast<const T*>(p.q);
  T* out = static_cast<T*>(p.out);
  const f32x8 scale = bcast8(static_cast<float>(p.softmax_scale));
  alignas(32) float probs[kFwdBlockMinKeys * 8];  // probs[8 * j + lane]: scores, then probabilities
  LaneRows<T, kD> q_lane;
  const float *k_lane[8], *v_lane[8];
  LaneRanges ranges;
  int64_t row[8], kv[8], rank[8];
  u32x8 heads, tokens;  // of the lanes, for the dropout mask
  PairBatches batches(lq, g1 - g0, group);
  while (const int lanes = batches.next(row, kv, rank)) {
    for (int l = 0; l < 8; ++l) {
      const int64_t h = (g0 + kv[l]) * group + rank[l], t = q0 + row[l];
      heads[l] = static_cast<uint32_t>(h), tokens[l] = static_cast<uint32_t>(t);
      q_lane.set(l, q + t * p.q_row + h * p.q_head);
      k_lane[l] = keys.row(kv[l], 0);
      v_lane[l] = values.row(kv[l], 0);
    }
    ranges.set(p, row, lq, lk);
    const int64_t j0 = ranges.begin, j1 = ranges.end;
    const i32x8 n = ranges.count();
    f32x8 row_max = f32x8{} - INFINITY;
    for (int64_t j = j0; j < j1; ++j) {
      const f32x8 scores = dot8_lanes<kD>(q_lane.row, k_lane, j * keys.row_stride) * scale;
      const f32x8 visible = ranges.visible(j) ? scores : f32x8{} - INFINITY;
      store8(probs + 8 * j, visible);
      row_max = visible > row_max ? visible : row_max;
    }
    // A lane with no keys shifts by 0, so that its exp(-inf - shift) is 0 and not NaN.
    const f32x8 shift = row_max == f32x8{} - INFINITY ? f32x8{} : row_max;
    f32x8 sum{};
    for (int64_t j = j0; j < j1; ++j) {
      const f32x8 e = exp8(load8(probs + 8 * j) - shift);
      store8(probs + 8 * j, e);
      sum += e;
    }
    // Dropout scales the weights of P @ V, not the normaliser: sum and lse are the undropped softmax's.
    if (p.dropout_p > 0.0) {
      const f32x8 kept = f32x8{} + static_cast<float>(p.dropout_scale);
      for (int64_t j = j0; j < j1; ++j) {
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
      const float* v_rows = v_lane[l] + ranges.lo[l] * values.row_stride;
      store_weighted_sum<T, kD>(out + t * p.out_row + h * p.out_head, probs + 8 * ranges.lo[l] + l, 8, ranges.size(l),
                                inv[l], [&](int64_t j) { return v_rows + j * values.row_stride; });
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
void bwd_short_segment(const AttentionParams& p, int64_t q0, int64_t lq, int64_t k0, int64_t lk, int64_t g0, int64_t g1,
                       const Block<const A>& keys, const Block<const A>& values, const Block<A>& dk_acc,
                       const Block<A>& dv_acc) {
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
  LaneRanges ranges;
  alignas(32) float lse_lane[8];
  int64_t row[8], kv[8], rank[8];
  u32x8 heads, tokens;  // of the lanes, for the dropout mask
  PairBatches batches(lq, g1 - g0, group);
  while (const int lanes = batches.next(row, kv, rank)) {
    for (int l = 0; l < 8; ++l) {
      const int64_t h = (g0 + kv[l]) * group + rank[l], t = q0 + row[l];
      heads[l] = static_cast<uint32_t>(h), tokens[l] = static_cast<uint32_t>(t);
      q_lane.set(l, q + t * p.q_row + h * p.q_head);
      do_lane.set(l, dout + t * p.dout_row + h * p.dout_head);
      k_lane[l] = keys.row(kv[l], 0);
      v_lane[l] = values.row(kv[l], 0);
      lse_lane[l] = p.lse[h * p.total_q + t];
    }
    ranges.set(p, row, lq, lk);
    const int64_t j0 = ranges.begin, j1 = ranges.end;
    const f32x8 lse = load8(lse_lane);
    f32x8 delta{}, prob_sum{};  // the softmax Jacobian's correction, as in softmax_backward_row
    for (int64_t j = j0; j < j1; ++j) {
      const f32x8 scores = dot8_lanes<kD>(q_lane.row, k_lane, j * keys.row_stride) * scale;
      f32x8 dp = dot8_lanes<kD>(do_lane.row, v_lane, j * values.row_stride);
      const i32x8 visible = ranges.visible(j);
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
    for (int64_t j = j0; j < j1; ++j) store8(dscores + 8 * j, load8(probs + 8 * j) * (load8(dscores + 8 * j) - delta));
    for (int l = 0; l < lanes; ++l) {
      const int64_t h = heads[l], lo = ranges.lo[l];
      const float* k_rows = k_lane[l] + lo * keys.row_stride;
      store_weighted_sum<T, kD>(dq + (q0 + row[l]) * q_stride + h * kD, dscores + 8 * lo + l, 8, ranges.size(l),
                                scale_s, [&](int64_t j) { return k_rows + j * keys.row_stride; });
      for (int64_t j = lo; j < ranges.hi[l]; ++j) {
        add_scaled<kD>(dk_acc.row(kv[l], j), scale_s * dscores[8 * j + l], q_lane.row[l]);
        add_scaled<kD>(dv_acc.row(kv[l], j), weights_dv[8 * j + l], do_lane.row[l]);
      }
    }
  }
}
