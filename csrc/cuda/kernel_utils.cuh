// Device helpers shared by the forward and backward kernels: the thread layout, 16-byte vector loads and
// stores with fp32 conversion, and reductions over a row's lanes. CUDA runtime headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/philox.h"
#include "varlen_attention.h"

namespace hierkern {
namespace cuda {

// Thread layout, the same in every kernel: a CTA of kThreads threads owns kRows consecutive rows (query
// rows, or key rows in the dk/dv pass); each row belongs to kLanesPerRow adjacent lanes, each lane
// holding kElems consecutive head-dim elements in fp32 registers. A score is a kElems-wide partial dot
// product plus log2(kLanesPerRow) shuffles ("group" is GQA's query heads per kv head, never these lanes).
// Keeping kElems fixed keeps the register budget independent of head_dim; head_dim only changes how many
// rows a CTA owns.
//
// Rows walk their own key interval inside a shared-memory block of kBlock keys, so for words (~4.5
// characters) a query row does ~5 dot products instead of a full masked tile; a segment longer than a
// block is streamed block by block with the online softmax (the flash-style path).
constexpr int kThreads = 128;
// The register budget: four resident CTAs per SM cap every kernel at 65536 / (4 * 128) = 128 registers
// per thread (tests/test_cuda_build.py asserts it, with zero spills). Without the cap sm_90a gives the
// dk/dv kernel ~140 and one CTA less per SM.
constexpr int kMinBlocksPerSM = 4;
static_assert(kMaxTokens + kThreads <= INT32_MAX, "a tile's rows past kMaxTokens would overflow int");
constexpr int kElems = 16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T, int HeadDim>
struct Layout {
  static_assert(HeadDim % kElems == 0 && kThreads % (HeadDim / kElems) == 0, "unsupported head_dim");
  static constexpr int kLanesPerRow = HeadDim / kElems;
  static constexpr int kRows = kThreads / kLanesPerRow;
  // Two staged operand blocks (k and v, or q and dout) take at most 32 KiB: four CTAs fit per SM, and
  // static shared memory stays under the 48 KiB that needs no opt-in.
  static constexpr int kBlock = HeadDim * sizeof(T) <= 256 ? 64 : 32;
  static constexpr int kVecsPerRow = HeadDim * static_cast<int>(sizeof(T)) / 16;
};

__device__ __forceinline__ void to_float(const uint4& u, float* x) {
  x[0] = __uint_as_float(u.x);
  x[1] = __uint_as_float(u.y);
  x[2] = __uint_as_float(u.z);
  x[3] = __uint_as_float(u.w);
}

// Loads kElems consecutive elements (16-byte aligned, global or shared) into fp32 registers.
__device__ __forceinline__ void load_elems(const float* p, float (&x)[kElems]) {
#pragma unroll
  for (int i = 0; i < kElems / 4; ++i) to_float(reinterpret_cast<const uint4*>(p)[i], x + 4 * i);
}

__device__ __forceinline__ void load_elems(const __half* p, float (&x)[kElems]) {
#pragma unroll
  for (int i = 0; i < kElems / 8; ++i) {
    union {
      uint4 u;
      __half2 h[4];
    } pack;
    pack.u = reinterpret_cast<const uint4*>(p)[i];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(pack.h[j]);
      x[8 * i + 2 * j] = f.x;
      x[8 * i + 2 * j + 1] = f.y;
    }
  }
}

__device__ __forceinline__ void load_elems(const __nv_bfloat16* p, float (&x)[kElems]) {
#pragma unroll
  for (int i = 0; i < kElems / 8; ++i) {
    union {
      uint4 u;
      __nv_bfloat162 h[4];
    } pack;
    pack.u = reinterpret_cast<const uint4*>(p)[i];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(pack.h[j]);
      x[8 * i + 2 * j] = f.x;
      x[8 * i + 2 * j + 1] = f.y;
    }
  }
}

__device__ __forceinline__ void store_elems(float* p, const float (&x)[kElems]) {
#pragma unroll
  for (int i = 0; i < kElems / 4; ++i) {
    reinterpret_cast<uint4*>(p)[i] = make_uint4(__float_as_uint(x[4 * i]), __float_as_uint(x[4 * i + 1]),
                                                __float_as_uint(x[4 * i + 2]), __float_as_uint(x[4 * i + 3]));
  }
}

__device__ __forceinline__ void store_elems(__half* p, const float (&x)[kElems]) {
#pragma unroll
  for (int i = 0; i < kElems / 8; ++i) {
    union {
      uint4 u;
      __half2 h[4];
    } pack;
#pragma unroll
    for (int j = 0; j < 4; ++j) pack.h[j] = __floats2half2_rn(x[8 * i + 2 * j], x[8 * i + 2 * j + 1]);
    reinterpret_cast<uint4*>(p)[i] = pack.u;
  }
}

__device__ __forceinline__ void store_elems(__nv_bfloat16* p, const float (&x)[kElems]) {
#pragma unroll
  for (int i = 0; i < kElems / 8; ++i) {
    union {
      uint4 u;
      __nv_bfloat162 h[4];
    } pack;
#pragma unroll
    for (int j = 0; j < 4; ++j) pack.h[j] = __floats2bfloat162_rn(x[8 * i + 2 * j], x[8 * i + 2 * j + 1]);
    reinterpret_cast<uint4*>(p)[i] = pack.u;
  }
}

// Sum over the kLanes adjacent lanes that share a row. Every lane of the warp must call it.
template <int kLanes>
__device__ __forceinline__ float lane_sum(float x) {
#pragma unroll
  for (int lane_mask = kLanes / 2; lane_mask > 0; lane_mask >>= 1) x += __shfl_xor_sync(0xffffffffu, x, lane_mask);
  return x;
}

__device__ __forceinline__ float dot_elems(const float (&a)[kElems], const float (&b)[kElems]) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < kElems; ++e) s = fmaf(a[e], b[e], s);
  return s;
}

// Host side of a launch, shared by the launchers and the host emulation (tests/cuda_emulation_harness.cpp):
// the grid over (row tiles, heads) and the dropout constants the kernels take.
template <typename T, int HeadDim>
inline dim3 row_grid(int rows, int heads) {
  constexpr int kRows = Layout<T, HeadDim>::kRows;
  return dim3((rows + kRows - 1) / kRows, heads);
}

struct DropoutConsts {
  uint32_t threshold;  // keep iff the Philox draw is >= threshold
  float scale;         // 1 / (1 - p) for kept weights
};

inline DropoutConsts dropout_consts(float p) {
  return {dropout_threshold(p), p > 0.f ? 1.f / (1.f - p) : 1.f};
}

template <typename T>
__device__ __forceinline__ const T* head_ptr(const void* base, int head, int64_t head_stride) {
  return static_cast<const T*>(base) + static_cast<int64_t>(head) * head_stride;
}

// Dispatches a functor templated on (T, HeadDim) from run-time dtype and head_dim. Returns
// cudaErrorInvalidValue for combinations without a kernel (the binding refuses them first).
template <template <typename, int> class Launch, typename Args>
cudaError_t dispatch(const Args& args, cudaStream_t stream) {
#define HK_HEAD_DIMS(T)                         \
  switch (args.head_dim) {                      \
    case 32:                                    \
      return Launch<T, 32>::run(args, stream);  \
    case 64:                                    \
      return Launch<T, 64>::run(args, stream);  \
    case 128:                                   \
      return Launch<T, 128>::run(args, stream); \
    default:                                    \
      return cudaErrorInvalidValue;             \
  }
  switch (args.dtype) {
    case DType::kFloat32:
      HK_HEAD_DIMS(float)
    case DType::kFloat16:
      HK_HEAD_DIMS(__half)
    case DType::kBFloat16:
      HK_HEAD_DIMS(__nv_bfloat16)
  }
#undef HK_HEAD_DIMS
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace hierkern
