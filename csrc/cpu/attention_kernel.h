// Torch-free interface between the op bindings (attention_cpu.cpp) and the kernels, which are compiled once
// per instruction set (kernel_generic.cpp, kernel_avx2.cpp) and chosen at run time.
#pragma once

#include <algorithm>
#include <cstdint>

namespace hierkern {
namespace cpu {

enum class ScalarKind { kFloat, kDouble, kBFloat16, kHalf };

// Everything a kernel reads or writes, as raw pointers and element strides. Tensors of shape
// (total, heads, head_dim) have a unit stride along head_dim; lse is contiguous (H, total_q) float32;
// dq/dk/dv are contiguous. A "unit" of work is one (segment, kv-head) pair, unit = segment * H_kv + kv_head:
// it owns every query head of its group, so the dk/dv of its keys are written by exactly one thread.
struct AttentionParams {
  ScalarKind kind;
  int64_t num_segments, num_heads, num_kv_heads, head_dim, total_q, total_k;
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  double softmax_scale;
  // FlashAttention's window_size: query row i of a segment (Lq queries, Lk keys) sees key j iff
  // j >= i + Lk - Lq - window_left and j <= i + Lk - Lq + window_right, -1 leaving that side unbounded
  // (causal is (-1, 0)). Checked to be >= -1.
  int64_t window_left, window_right;
  // Attention dropout: weight (head, query token, key token) is kept, scaled by 1 / (1 - dropout_p), iff its
  // Philox draw under (dropout_seed, dropout_offset) is at least dropout_threshold (csrc/common/philox.h: the
  // CUDA kernels' generator too, so both backends drop the same weights for the same rng_state).
  double dropout_p, dropout_scale;
  uint32_t dropout_threshold;
  uint64_t dropout_seed, dropout_offset;

  const void* q;
  int64_t q_row, q_head;
  const void* k;
  int64_t k_row, k_head;
  const void* v;
  int64_t v_row, v_head;
  // Forward only: written.
  void* out;
  int64_t out_row, out_head;
  float* lse;
  // Backward only.
  const void* dout;
  int64_t dout_row, dout_head;
  void* dq;
  void* dk;
  void* dv;
};

// The keys [lo, hi) of its segment (lq queries, lk keys) that query row i sees: one contiguous range under any
// window. lo <= hi always (lo = hi for a row that sees nothing), and both are nondecreasing in i, which the
// blocked kernels rely on: the rows that see a key are consecutive.
struct KeyRange {
  int64_t lo, hi;
  int64_t size() const { return hi - lo; }
};

inline KeyRange visible_keys(const AttentionParams& p, int64_t i, int64_t lq, int64_t lk) {
  const int64_t diag = i + lk - lq;
  const int64_t hi = p.window_right < 0 ? lk : std::clamp<int64_t>(diag + p.window_right + 1, 0, lk);
  const int64_t lo = p.window_left < 0 ? 0 : std::clamp<int64_t>(diag - p.window_left, 0, lk);
  return {std::min(lo, hi), hi};
}

using UnitRangeFn = void (*)(const AttentionParams&, int64_t unit_begin, int64_t unit_end);

// One namespace per instruction set; each defines the forward and backward over a range of units.
#define HIERKERN_DECLARE_KERNELS(isa)                                                    \
  namespace isa {                                                                        \
  void varlen_fwd_units(const AttentionParams& p, int64_t unit_begin, int64_t unit_end); \
  void varlen_bwd_units(const AttentionParams& p, int64_t unit_begin, int64_t unit_end); \
  }

HIERKERN_DECLARE_KERNELS(generic)
HIERKERN_DECLARE_KERNELS(avx2)

// Whether kernel_avx2.cpp was compiled with AVX2+FMA+F16C code generation (GCC/Clang on x86-64).
bool avx2_kernels_built();

}  // namespace cpu
}  // namespace hierkern
