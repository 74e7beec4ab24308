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

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "attention_kernel.h"
// Torch-free and host-compilable: the CUDA kernels' Philox, so that the CPU kernels drop the same weights.
#include "../cuda/philox.cuh"
