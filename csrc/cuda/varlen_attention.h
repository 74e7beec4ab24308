// Torch-free host API of the CUDA varlen attention kernels: plain structs of raw device pointers, sizes
// and strides, launched on a caller-given stream. binding.cpp is the only torch-aware code.
//
// Layout (FlashAttention's varlen convention): q (total_q, num_heads, head_dim), k/v (total_k,
// num_kv_heads, head_dim) with a unit stride on head_dim and 16-byte aligned rows (the launchers do not
// check: binding.cpp copies tensors that break it), int32 cu_seqlens_q/cu_seqlens_k (num_segments + 1,)
// on the device, lse (num_heads, total_q) float32. Outputs are dense: out/dq (total_q, num_heads,
// head_dim), dk/dv (total_k, num_kv_heads, head_dim).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "schedule.cuh"

namespace hierkern {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Most tokens on either side. Token indices are int: a tile's first row plus its rows (at most 128, the
// CTA size), a key block's start plus its 64 keys, and the grid's rounding up of total / rows per tile must
// all stay below 2^31. Offsets that scale with heads or head_dim are int64.
constexpr int64_t kMaxTokens = INT32_MAX - 128;

// Head dims with a compiled kernel; others are refused by the binding and by the Python backend.
inline bool head_dim_supported(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

struct VarlenArgs {
  DType dtype;
  int head_dim;
  int num_heads;
  int num_kv_heads;
  int total_q;
  int total_k;
  int num_segments;
  const void* q;
  const void* k;
  const void* v;
  int64_t q_token_stride, q_head_stride;  // in elements
  int64_t k_token_stride, k_head_stride;
  int64_t v_token_stride, v_head_stride;
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  float softmax_scale;
  Window window;    // negative sides unbounded; causal is (-1, 0)
  float dropout_p;  // 0 disables dropout
  uint64_t seed;    // rng_state[0]
  uint64_t offset;  // rng_state[1]
};

struct FwdArgs : VarlenArgs {
  void* out;   // dense (total_q, num_heads, head_dim)
  float* lse;  // (num_heads, total_q)
};

// The backward takes no out: delta = rowsum(dout * out) is recomputed in fp32 from P and dout . v (out is
// rounded to the input dtype, which a peaky softmax's dS = P (dP - delta) cannot afford).
struct BwdArgs : VarlenArgs {
  const void* dout;
  int64_t dout_token_stride, dout_head_stride;
  const float* lse;  // (num_heads, total_q) from the forward
  float* delta;      // scratch (num_heads, total_q): sum_j P_ij dP_ij, written by the dq pass
  void* dq;          // dense (total_q, num_heads, head_dim)
  void* dk;          // dense (total_k, num_kv_heads, head_dim)
  void* dv;
};

// Launch the forward (one kernel). Returns the launch error, cudaSuccess when nothing was launched.
cudaError_t varlen_fwd(const FwdArgs& args, cudaStream_t stream);

// Launch the backward: a dq pass over query tiles (which also writes delta), then a dk/dv pass over key
// tiles. Both are deterministic and atomic-free.
cudaError_t varlen_bwd(const BwdArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace hierkern
