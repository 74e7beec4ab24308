// Everything attention_kernel_impl.h uses, included by kernel_<isa>.cpp *before* it switches the
// code-generation target, so library code is compiled once for the baseline and only our kernels per ISA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // the 32x32->64-bit multiplies of the dropout RNG (mulhilo8)
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/philox.h"
#include "attention_kernel.h"
