// Launchers of the kernels in varlen_fwd_kernel.cuh.
#include "varlen_fwd_kernel.cuh"

namespace hierkern {
namespace cuda {
namespace {

template <typename T, int HeadDim>
struct LaunchFwd {
  static cudaError_t run(const FwdArgs& args, cudaStream_t stream) {
    const DropoutConsts drop = dropout_consts(args.dropout_p);
    varlen_fwd_kernel<T, HeadDim>
        <<<row_grid<T, HeadDim>(args.total_q, args.num_heads), kThreads, 0, stream>>>(args, drop.threshold, drop.scale);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t varlen_fwd(const FwdArgs& args, cudaStream_t stream) {
  if (args.total_q == 0 || args.num_heads == 0) return cudaSuccess;
  return dispatch<LaunchFwd>(args, stream);
}

}  // namespace cuda
}  // namespace hierkern
