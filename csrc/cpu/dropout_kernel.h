// Torch-free interface between the dropout op bindings (dropout_cpu.cpp) and the element-wise dropout
// kernels, compiled once per instruction set (dropout_generic.cpp, dropout_avx2.cpp) like the attention
// kernels and chosen at run time.
#pragma once

#include <cstdint>

#include "attention_kernel.h"  // ScalarKind, avx2_kernels_built

namespace hierkern {
namespace cpu {

// out = residual + x * factor element by element, factor = scale where element i of x is kept, else 0
// (residual == nullptr: no residual). x, residual and out are contiguous arrays of numel elements of `kind`;
// element i is the i-th in x's row-major order, whatever x's strides were (csrc/common/philox.h: the
// element layout says which Philox word decides it).
struct DropoutParams {
  ScalarKind kind;
  int64_t numel;
  const void* x;
  const void* residual;
  void* out;
  uint32_t threshold;  // kept iff the element's 32-bit draw is >= threshold
  double scale;        // 1 / (1 - p), applied in float for every dtype but double
  uint64_t seed, offset;
};

// Elements are processed in chunks of kDropoutChunk: one eight-lane Philox call decides a whole chunk.
constexpr int64_t kDropoutChunk = 32;

using DropoutChunksFn = void (*)(const DropoutParams&, int64_t chunk_begin, int64_t chunk_end);

#define HIERKERN_DECLARE_DROPOUT(isa)                                                  \
  namespace isa {                                                                      \
  void dropout_chunks(const DropoutParams& p, int64_t chunk_begin, int64_t chunk_end); \
  }

HIERKERN_DECLARE_DROPOUT(generic)
HIERKERN_DECLARE_DROPOUT(avx2)

}  // namespace cpu
}  // namespace hierkern
