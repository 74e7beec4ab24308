// The dropout kernels compiled for AVX2 + F16C, chosen at run time by dropout_cpu.cpp when the CPU has them
// (the same condition as the attention kernels': kernel_avx2.cpp). Elsewhere this file defines a stub that is
// never selected.
#include "kernel_common.h"
#include "dropout_kernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HIERKERN_AVX2_BUILT 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace hierkern {
namespace cpu {
namespace avx2 {
#include "impl_vector.h"
#include "impl_dropout.h"
#include "dropout_impl.h"
}  // namespace avx2
}  // namespace cpu
}  // namespace hierkern

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
namespace hierkern {
namespace cpu {
namespace avx2 {
void dropout_chunks(const DropoutParams&, int64_t, int64_t) {}
}  // namespace avx2
}  // namespace cpu
}  // namespace hierkern
#endif
