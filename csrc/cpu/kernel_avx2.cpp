// The kernels compiled for AVX2 + FMA (8 floats per instruction, fused multiply-add) + F16C (8 halves to
// floats in one instruction; every AVX2 CPU has it), chosen at run time by attention_cpu.cpp when the CPU has
// them. Where the compiler cannot target them per function (not GCC/Clang on x86-64), this file only reports
// that the AVX2 build is absent.
#include "kernel_common.h"

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
#include "attention_kernel_impl.h"
}  // namespace avx2
}  // namespace cpu
}  // namespace hierkern

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
#define HIERKERN_AVX2_BUILT 0
namespace hierkern {
namespace cpu {
namespace avx2 {
void varlen_fwd_units(const AttentionParams&, int64_t, int64_t) {}
void varlen_bwd_units(const AttentionParams&, int64_t, int64_t) {}
}  // namespace avx2
}  // namespace cpu
}  // namespace hierkern
#endif

namespace hierkern {
namespace cpu {
bool avx2_kernels_built() {
  return HIERKERN_AVX2_BUILT;
}
}  // namespace cpu
}  // namespace hierkern
