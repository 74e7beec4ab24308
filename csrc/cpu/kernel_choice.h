// What the CPU op bindings (attention_cpu.cpp, dropout_cpu.cpp) share: which instruction-set build of the
// kernels runs, and the dtype the kernels are told.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>

#include "attention_kernel.h"  // ScalarKind, avx2_kernels_built

namespace hierkern {
namespace cpu {

// Whether the AVX2+FMA+F16C build runs on this CPU. HIERKERN_CPU_KERNELS=generic forces the baseline build, so
// that tests on AVX2 machines check it too. Each binding reads it once, at its first call.
inline bool use_avx2_kernels() {
  const char* forced = std::getenv("HIERKERN_CPU_KERNELS");
  if (forced != nullptr && std::string(forced) == "generic") return false;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return avx2_kernels_built() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The kernels' name for t's dtype; any other dtype is a TypeError naming the argument (`who`: the message's
// prefix).
inline ScalarKind scalar_kind(const at::Tensor& t, const char* who, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat;
    case at::kDouble:
      return ScalarKind::kDouble;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    case at::kHalf:
      return ScalarKind::kHalf;
    default:
      TORCH_CHECK_TYPE(false, who, name, " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
  }
}

}  // namespace cpu
}  // namespace hierkern
