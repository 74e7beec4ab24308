// The kernels for the baseline instruction set of the build (SSE2 on x86-64): always present.
#include "kernel_common.h"

// GCC notes that 32-byte vectors pass differently with and without AVX; every function taking one is inline in
// this translation unit's own namespace, so no call crosses that boundary.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace hierkern {
namespace cpu {
namespace generic {
#include "attention_kernel_impl.h"
}  // namespace generic
}  // namespace cpu
}  // namespace hierkern
