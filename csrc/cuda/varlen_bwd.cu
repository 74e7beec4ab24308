// Launchers of the kernels in varlen_bwd_kernel.cuh.
#include "varlen_bwd_kernel.cuh"

namespace hierkern {
namespace cuda {
namespace {

template <typename T, int HeadDim>
struct LaunchBwd {
  static cudaError_t run(const BwdArgs& args, cudaStream_t stream) {
    const DropoutConsts drop = dropout_consts(args.dropout_p);
    // The dq pass writes delta, which the dk/dv pass reads: stream order is the only synchronisation.
    if (args.total_q > 0) {
      varlen_bwd_dq_kernel<T, HeadDim><<<row_grid<T, HeadDim>(args.total_q, args.num_heads), kThreads, 0, stream>>>(
          args, drop.threshold, drop.scale);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    if (args.total_k > 0) {
      varlen_bwd_dkdv_kernel<T, HeadDim>
          <<<row_grid<T, HeadDim>(args.total_k, args.num_kv_heads), kThreads, 0, stream>>>(args, drop.threshold,
                                                                                           drop.scale);
      return cudaGetLastError();
    }
    return cudaSuccess;
  }
};

}  // namespace

cudaError_t varlen_bwd(const BwdArgs& args, cudaStream_t stream) {
  if (args.num_heads == 0) return cudaSuccess;
  return dispatch<LaunchBwd>(args, stream);
}

}  // namespace cuda
}  // namespace hierkern
