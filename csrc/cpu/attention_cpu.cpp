// CPU implementations of hierkern::varlen_fwd / varlen_bwd: input validation, work partitioning and the
// choice of instruction set. The arithmetic lives in attention_kernel_impl.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention_kernel.h"
#include "kernel_choice.h"
#include "../common/philox.h"  // dropout_threshold, shared with the CUDA kernels
#include "../common/varlen_checks.h"

namespace hierkern {
namespace cpu {
namespace {

// The prefix of every message.
constexpr const char* kWho = "hierkern CPU attention: ";

struct Kernels {
  UnitRangeFn fwd;
  UnitRangeFn bwd;
};

// The best kernels this CPU runs, chosen once.
Kernels select_kernels() {
  if (use_avx2_kernels()) return {avx2::varlen_fwd_units, avx2::varlen_bwd_units};
  return {generic::varlen_fwd_units, generic::varlen_bwd_units};
}

const Kernels& kernels() {
  static const Kernels selected = select_kernels();
  return selected;
}

// Kernels index rows with strides but read head_dim contiguously.
at::Tensor unit_stride_last(const at::Tensor& t) {
  return t.stride(2) == 1 ? t : t.contiguous();
}

void check_packed(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 3, "hierkern CPU attention: ", name, " must have shape (total, heads, head_dim), got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "hierkern CPU attention: ", name, " must be a CPU tensor, got ", t.device());
}

// Validates offsets completely (they are on the host, so this is O(S) and cheap next to the attention) and
// returns the longest segment.
int64_t check_offsets(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen, const char* max_name) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "hierkern CPU attention: ", name, " must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.device().is_cpu(), "hierkern CPU attention: ", name, " must be a CPU tensor, got ", cu.device());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, "hierkern CPU attention: ", name,
                    " must be 1-D of shape (S + 1,), got ", cu.sizes());
  const int32_t* o = cu.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(o[0] == 0, "hierkern CPU attention: ", name, "[0] must be 0, got ", o[0]);
  int64_t longest = 0;
  for (int64_t s = 0; s + 1 < cu.numel(); ++s) {
    TORCH_CHECK_VALUE(o[s + 1] >= o[s], "hierkern CPU attention: ", name, " must be non-decreasing, but ", name, "[",
                      s + 1, "]=", o[s + 1], " < ", name, "[", s, "]=", o[s]);
    longest = std::max<int64_t>(longest, o[s + 1] - o[s]);
  }
  TORCH_CHECK_VALUE(o[cu.numel() - 1] == total, "hierkern CPU attention: ", name,
                    "[-1] must equal the number of packed tokens (", total, "), got ", o[cu.numel() - 1]);
  TORCH_CHECK_VALUE(longest <= max_seqlen, "hierkern CPU attention: ", max_name, "=", max_seqlen,
                    " is smaller than the longest segment in ", name, " (", longest, ")");
  return longest;
}

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                            const at::Tensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                            int64_t window_left, int64_t window_right, double dropout_p,
                            const c10::optional<at::Tensor>& rng_state) {
  check_packed(q, "q");
  check_packed(k, "k");
  check_packed(v, "v");
  const ScalarKind kind = scalar_kind(q, kWho, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "hierkern CPU attention: q, k and v must share a dtype, got ", q.scalar_type(), ", ",
                   k.scalar_type(), ", ", v.scalar_type());
  check_varlen_shapes(kWho, q, k, v, cu_q, cu_k);
  TORCH_CHECK_VALUE(q.size(2) > 0, kWho, "head_dim must be positive");
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), kWho, "softmax_scale must be finite, got ", softmax_scale);
  check_window(kWho, window_left, window_right);
  check_dropout_p(kWho, dropout_p);
  check_offsets(cu_q, "cu_seqlens_q", q.size(0), max_seqlen_q, "max_seqlen_q");
  check_offsets(cu_k, "cu_seqlens_k", k.size(0), max_seqlen_k, "max_seqlen_k");

  AttentionParams p{};
  p.kind = kind;
  p.num_segments = cu_q.numel() - 1;
  p.num_heads = q.size(1);
  p.num_kv_heads = k.size(1);
  p.head_dim = q.size(2);
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.softmax_scale = softmax_scale;
  p.window_left = window_left;
  p.window_right = window_right;
  if (dropout_p > 0.0) {
    const RngState rng = read_rng_state(kWho, dropout_p, rng_state);
    p.dropout_p = dropout_p;
    p.dropout_scale = 1.0 / (1.0 - dropout_p);
    // The CUDA kernels' threshold for the float32 dropout_p they receive: both backends keep the same weights.
    p.dropout_threshold = ::hierkern::dropout_threshold(static_cast<float>(dropout_p));
    p.dropout_seed = rng.seed;
    p.dropout_offset = rng.offset;
  }
  p.q = q.data_ptr();
  p.q_row = q.stride(0);
  p.q_head = q.stride(1);
  p.k = k.data_ptr();
  p.k_row = k.stride(0);
  p.k_head = k.stride(1);
  p.v = v.data_ptr();
  p.v_row = v.stride(0);
  p.v_head = v.stride(1);
  return p;
}

// Keys scored by the rows of a segment of lq queries and lk keys. Without a left bound every row counts as
// seeing the whole segment, the estimate the split was measured with (causal rows see half of it on average);
// with one, a long segment's rows see a small fraction of it, so the rows' ranges are summed: O(lq) on the host
// next to O(lq * window * head_dim) in the kernels.
int64_t scored_keys(const AttentionParams& p, int64_t lq, int64_t lk) {
  if (p.window_left < 0) return lq * lk;
  int64_t keys = 0;
  for (int64_t i = 0; i < lq; ++i) keys += visible_keys(p, i, lq, lk).size();
  return keys;
}

// Splits the (segment, kv-head) units into one contiguous range per thread of roughly equal cost, so that
// one long segment among thousands of words does not leave the other threads idle. Runs `fn` on each range.
void run_balanced(const AttentionParams& p, UnitRangeFn fn) {
  const int64_t units = p.num_segments * p.num_kv_heads;
  if (units == 0) return;
  const int64_t group = p.num_heads / p.num_kv_heads;
  std::vector<int64_t> cost_prefix(p.num_segments + 1, 0);
  for (int64_t s = 0; s < p.num_segments; ++s) {
    const int64_t lq = p.cu_seqlens_q[s + 1] - p.cu_seqlens_q[s];
    const int64_t lk = p.cu_seqlens_k[s + 1] - p.cu_seqlens_k[s];
    // Scores, plus loading and writing rows, plus a fixed per-unit overhead; all times head_dim.
    cost_prefix[s + 1] = cost_prefix[s] + (group * (scored_keys(p, lq, lk) + 2 * lq) + 2 * lk + 8) * p.head_dim;
  }
  const int64_t total_cost = cost_prefix.back() * p.num_kv_heads;
  // Below ~a few microseconds of work, waking threads costs more than it saves.
  const int64_t parts = total_cost < (1 << 15) ? 1 : std::min<int64_t>(at::get_num_threads(), units);
  if (parts <= 1) {
    fn(p, 0, units);
    return;
  }
  // Cost of the units before unit u: whole segments before it, times kv heads, plus earlier heads of its own.
  auto cost_before = [&](int64_t u) {
    const int64_t s = u / p.num_kv_heads, h = u % p.num_kv_heads;
    return cost_prefix[s] * p.num_kv_heads + h * (cost_prefix[s + 1] - cost_prefix[s]);
  };
  std::vector<int64_t> bounds(parts + 1, units);
  bounds[0] = 0;
  for (int64_t t = 1; t < parts; ++t) {
    const int64_t target = total_cost * t / parts;
    int64_t lo = bounds[t - 1], hi = units;  // first unit whose start cost reaches target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (cost_before(mid) < target)
        lo = mid + 1;
      else
        hi = mid;
    }
    bounds[t] = lo;
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(p, bounds[t], bounds[t + 1]);
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                  const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                  int64_t max_seqlen_k, double softmax_scale, int64_t window_left,
                                                  int64_t window_right, double dropout_p,
                                                  const c10::optional<at::Tensor>& rng_state) {
  check_packed(q_in, "q");
  check_packed(k_in, "k");
  check_packed(v_in, "v");
  const at::Tensor q = unit_stride_last(q_in), k = unit_stride_last(k_in), v = unit_stride_last(v_in);
  // Offsets of any stride are valid input; the kernels index them with unit stride (a copy of S + 1 ints if not).
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  AttentionParams p = make_params(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                                  window_right, dropout_p, rng_state);
  // torch::empty, not zeros: the kernel writes every element (rows without keys get 0 and -inf).
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.out_row = out.stride(0);
  p.out_head = out.stride(1);
  p.lse = lse.data_ptr<float>();
  run_balanced(p, kernels().fwd);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, int64_t window_left, int64_t window_right,
    double dropout_p, const c10::optional<at::Tensor>& rng_state) {
  check_packed(dout_in, "dout");
  check_packed(q_in, "q");
  check_packed(k_in, "k");
  check_packed(v_in, "v");
  check_packed(out_in, "out");
  const at::Tensor q = unit_stride_last(q_in), k = unit_stride_last(k_in), v = unit_stride_last(v_in);
  const at::Tensor dout = unit_stride_last(dout_in);
  // Offsets of any stride, as in varlen_fwd_cpu.
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  AttentionParams p = make_params(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                                  window_right, dropout_p, rng_state);
  // out is part of the op's contract (other backends form rowsum(dout * out) from it). This kernel sums the same
  // thing in float from the probabilities it recomputes, so it never reads out, but still rejects one that
  // cannot belong to q.
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out_in.sizes() == q.sizes(),
                    "hierkern CPU attention: dout and "
                    "out must have q's shape ",
                    q.sizes(), ", got ", dout.sizes(), " and ", out_in.sizes());
  TORCH_CHECK_TYPE(dout.scalar_type() == q.scalar_type() && out_in.scalar_type() == q.scalar_type(),
                   "hierkern CPU attention: dout and out must have q's dtype ", q.scalar_type(), ", got ",
                   dout.scalar_type(), " and ", out_in.scalar_type());
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, "hierkern CPU attention: lse must be float32, got ",
                   lse_in.scalar_type());
  TORCH_CHECK_VALUE(
      lse_in.device().is_cpu() && lse_in.dim() == 2 && lse_in.size(0) == q.size(1) && lse_in.size(1) == q.size(0),
      "hierkern CPU attention: lse must be a CPU tensor of shape "
      "(heads, total_q) = (",
      q.size(1), ", ", q.size(0), "), got ", lse_in.sizes());
  const at::Tensor lse = lse_in.contiguous();
  // Every element is written: dq by its query row, dk/dv by the unit that owns their segment and kv head.
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = dout.data_ptr();
  p.dout_row = dout.stride(0);
  p.dout_head = dout.stride(1);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  run_balanced(p, kernels().bwd);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(hierkern, CPU, m) {
  m.impl("varlen_fwd", &varlen_fwd_cpu);
  m.impl("varlen_bwd", &varlen_bwd_cpu);
}

}  // namespace cpu
}  // namespace hierkern
