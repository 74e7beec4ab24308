// The dropout kernels for the baseline instruction set of the build (SSE2 on x86-64): always present.
#include "kernel_common.h"
#include "dropout_kernel.h"

// As in kernel_generic.cpp: every function taking a 32-byte vector is inline in this translation unit.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace hierkern {
namespace cpu {
namespace generic {
#include "impl_vector.h"
#include "impl_dropout.h"
#include "dropout_impl.h"
}  // namespace generic
}  // namespace cpu
}  // namespace hierkern
