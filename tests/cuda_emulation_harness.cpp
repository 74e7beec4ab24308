// ctypes entry points that run csrc/cuda's kernels under tests/cuda_host_emulation.h, for
// tests/test_cuda_emulation.py: the launchers' logic (row_grid, dropout_consts, the dq-then-dk/dv order)
// on host tensors, inputs with their own strides and dense outputs. Returns a cudaError_t:
// cudaErrorLaunchFailure when the emulation deadlocked.
#include "cuda_host_emulation.h"
#include "varlen_bwd_kernel.cuh"
#include "varlen_fwd_kernel.cuh"

using namespace hierkern::cuda;

namespace {

template <typename T, int HeadDim>
struct EmuFwd {
  static cudaError_t run(const FwdArgs& args, cudaStream_t) {
    const DropoutConsts drop = dropout_consts(args.dropout_p);
    const bool ok = hk_emu::launch(row_grid<T, HeadDim>(args.total_q, args.num_heads), kThreads,
                                   [&] { varlen_fwd_kernel<T, HeadDim>(args, drop.threshold, drop.scale); });
    return ok ? cudaSuccess : cudaErrorLaunchFailure;
  }
};

template <typename T, int HeadDim>
struct EmuBwd {
  static cudaError_t run(const BwdArgs& args, cudaStream_t) {
    const DropoutConsts drop = dropout_consts(args.dropout_p);
    bool ok = true;
    if (args.total_q > 0) {
      ok = hk_emu::launch(row_grid<T, HeadDim>(args.total_q, args.num_heads), kThreads,
                          [&] { varlen_bwd_dq_kernel<T, HeadDim>(args, drop.threshold, drop.scale); });
    }
    if (ok && args.total_k > 0) {
      ok = hk_emu::launch(row_grid<T, HeadDim>(args.total_k, args.num_kv_heads), kThreads,
                          [&] { varlen_bwd_dkdv_kernel<T, HeadDim>(args, drop.threshold, drop.scale); });
    }
    return ok ? cudaSuccess : cudaErrorLaunchFailure;
  }
};

// strides: (token, head) strides in elements of q, k, v (and dout for the backward), as the binding passes a
// tensor's own strides; outputs are dense.
void fill(VarlenArgs& a, int dtype, int head_dim, int num_heads, int num_kv_heads, int total_q, int total_k,
          int num_segments, const void* q, const void* k, const void* v, const long long* strides, const int* cu_q,
          const int* cu_k, float scale, int window_left, int window_right, float dropout_p, unsigned long long seed,
          unsigned long long offset) {
  a.dtype = static_cast<DType>(dtype);
  a.head_dim = head_dim;
  a.num_heads = num_heads;
  a.num_kv_heads = num_kv_heads;
  a.total_q = total_q;
  a.total_k = total_k;
  a.num_segments = num_segments;
  a.q = q;
  a.k = k;
  a.v = v;
  a.q_token_stride = strides[0];
  a.q_head_stride = strides[1];
  a.k_token_stride = strides[2];
  a.k_head_stride = strides[3];
  a.v_token_stride = strides[4];
  a.v_head_stride = strides[5];
  a.cu_seqlens_q = cu_q;
  a.cu_seqlens_k = cu_k;
  a.softmax_scale = scale;
  a.window = Window{window_left, window_right};
  a.dropout_p = dropout_p;
  a.seed = seed;
  a.offset = offset;
}

}  // namespace

extern "C" {

int emu_varlen_fwd(int dtype, int head_dim, int num_heads, int num_kv_heads, int total_q, int total_k, int num_segments,
                   const void* q, const void* k, const void* v, const long long* strides, const int* cu_q,
                   const int* cu_k, float scale, int window_left, int window_right, float dropout_p,
                   unsigned long long seed, unsigned long long offset, void* out, float* lse) {
  FwdArgs a{};
  fill(a, dtype, head_dim, num_heads, num_kv_heads, total_q, total_k, num_segments, q, k, v, strides, cu_q, cu_k, scale,
       window_left, window_right, dropout_p, seed, offset);
  a.out = out;
  a.lse = lse;
  if (total_q == 0) return cudaSuccess;
  return static_cast<int>(dispatch<EmuFwd>(a, nullptr));
}

int emu_varlen_bwd(int dtype, int head_dim, int num_heads, int num_kv_heads, int total_q, int total_k, int num_segments,
                   const void* q, const void* k, const void* v, const long long* strides, const int* cu_q,
                   const int* cu_k, float scale, int window_left, int window_right, float dropout_p,
                   unsigned long long seed, unsigned long long offset, const void* dout, const float* lse, float* delta,
                   void* dq, void* dk, void* dv) {
  BwdArgs a{};
  fill(a, dtype, head_dim, num_heads, num_kv_heads, total_q, total_k, num_segments, q, k, v, strides, cu_q, cu_k, scale,
       window_left, window_right, dropout_p, seed, offset);
  a.dout = dout;
  a.dout_token_stride = strides[6];
  a.dout_head_stride = strides[7];
  a.lse = lse;
  a.delta = delta;
  a.dq = dq;
  a.dk = dk;
  a.dv = dv;
  return static_cast<int>(dispatch<EmuBwd>(a, nullptr));
}
}
