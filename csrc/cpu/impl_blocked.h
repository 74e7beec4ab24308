// The blocked kernels of longer segments: a block of query rows of one head against the tensors' own
// key/value rows, forward and backward.
// Part of the CPU kernels' single source (attention_kernel_impl.h includes the parts in order): not a normal
// header. Compiled once per instruction set inside `namespace hierkern::cpu::<isa>`, it may only use what
// kernel_common.h included, and what the parts before it define.

// Blocked forward of query rows [i0, i0 + r) of head h (float, kD a multiple of 32), tokens token0 + b against
// keys key0 + j (key(j), val(j): rows of the tensors themselves), row b seeing keys range[b] (visible_keys):
// scores and softmax row by row, each row's scores from its range's first key on, then P @ V two rows at a
// time so that each value row is loaded once per pair.
template <typename T, int kD, typename KeyFn, typename ValFn, typename OutFn>
inline void fwd_block(const AttentionParams& p, int64_t head, int64_t token0, int64_t key0, const T* const* q_rows,
                      int64_t r, const KeyRange* range, float scale, float* scores, int64_t row_len, float* qrows,
                      float* lse_out[], OutFn&& out_row, KeyFn&& key, ValFn&& val) {
  float inv[kBlockRows];
  for (int64_t b = 0; b < r; ++b) {
    float* s = scores + b * row_len;
    const int64_t lo = range[b].lo, n = range[b].size();
    if (n == 0) {
      *lse_out[b] = -std::numeric_limits<float>::infinity();
      inv[b] = 0;
      continue;
    }
    float* qr = qrows + b * kD;
    load_row(qr, q_rows[b], kD, scale);
    const float row_max = scores8<kD>(s, qr, n, [&](int64_t j) { return key(lo + j); });
    const float sum = exp_shifted(s, n, row_max);
    if (p.dropout_p > 0.0) apply_dropout(p, head, token0 + b, key0 + lo, n, s);
    inv[b] = 1.0f / sum;
    *lse_out[b] = row_max + std::log(sum);
  }
  alignas(64) float res[2][kD];
  for (int64_t b = 0; b < r; b += 2) {
    const int64_t b1 = b + 1 < r ? b + 1 : b;
    combine2<kD>(res[0], res[1], scores + b * row_len, scores + b1 * row_len, range[b], range[b1], val);
    for (int64_t e = b; e <= b1; ++e) {
      T* o = out_row(e);
      for (int64_t c = 0; c < kD; ++c) o[c] = static_cast<T>(res[e - b][c] * inv[e]);
    }
  }
}

// Blocked backward of query rows [i0, i0 + r) of head h (float, kD a multiple of 32, r <= kBwdRows), tokens
// token0 + b against keys key0 + j (key(j), val(j): rows of the tensors themselves), row b seeing keys range[b]
// and keeping its score rows from that range's first key on. Row by row: P from the
// scores and lse, dP = dout . v, both score rows by scores8, then dS (softmax_backward_row, which applies
// dropout). Then the three products as register-tiled loops: dq = dS @ K two rows at a time (combine2),
// dk += dS^T (scale q) and dv += P^T dout two keys at a time over all r rows (rank_update).
template <typename T, int kD, typename KeyFn, typename ValFn, typename DkFn, typename DvFn>
inline void bwd_block(const AttentionParams& p, int64_t head, int64_t token0, int64_t key0, const T* const* q_rows,
                      const T* const* do_rows, const float* lse, int64_t r, const KeyRange* range, float scale,
                      float* probs, float* dscores, float* factor, int64_t row_len, float* qrows, float* dorows,
                      T* const* dq_rows, KeyFn&& key, ValFn&& val, DkFn&& dk_row, DvFn&& dv_row) {
  for (int64_t b = 0; b < r; ++b) {
    const int64_t lo = range[b].lo, n = range[b].size();
    if (n == 0) continue;
    float* P = probs + b * row_len;
    float* dS = dscores + b * row_len;
    float* qr = qrows + b * kD;
    float* dor = dorows + b * kD;
    load_row(qr, q_rows[b], kD, scale);
    load_row(dor, do_rows[b], kD, 1.0f);
    scores8<kD>(P, qr, n, [&](int64_t j) { return key(lo + j); });
    scores8<kD>(dS, dor, n, [&](int64_t j) { return val(lo + j); });
    exp_shifted(P, n, lse[b]);
    softmax_backward_row(p, head, token0 + b, key0 + lo, n, P, dS, factor);
  }
  alignas(64) float res[2][kD];
  for (int64_t b = 0; b < r; b += 2) {
    const int64_t b1 = b + 1 < r ? b + 1 : b;
    combine2<kD>(res[0], res[1], dscores + b * row_len, dscores + b1 * row_len, range[b], range[b1], key);
    for (int64_t e = b; e <= b1; ++e)
      for (int64_t c = 0; c < kD; ++c) dq_rows[e][c] = static_cast<T>(scale * res[e - b][c]);
  }
  rank_update<kD>(dscores, row_len, qrows, r, range, dk_row);
  rank_update<kD>(probs, row_len, dorows, r, range, dv_row);
}
