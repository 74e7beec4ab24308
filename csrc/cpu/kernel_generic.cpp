// The kernels for the baseline instruction set of the build (SSE2 on x86-64): always present.
#include "kernel_common.h"

namespace hierkern {
namespace cpu {
namespace generic {
#include "attention_kernel_impl.h"
}  // namespace generic
}  // namespace cpu
}  // namespace hierkern
