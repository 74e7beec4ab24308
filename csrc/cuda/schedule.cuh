// Work schedule shared by the CUDA kernels: which keys a query row sees and which queries see a key row.
// Everything here is __host__ __device__ and torch-free so tests/test_cuda_build.py compiles it for the host
// and checks it against a Python model of the semantics on adversarial layouts.
//
// The whole schedule rests on one fact: under segment masking plus a sliding window (bottom-right aligned,
// causal being window (-1, 0)) the keys a query sees form one contiguous interval of packed key tokens, and
// both ends of that interval are non-decreasing in the query index. So the keys a tile of consecutive query
// rows needs are a union of sorted intervals that tile_union.cuh packs densely with one prefix sum, and the
// block-diagonal mask inside a tile is "begin <= key < end" per row. The same holds with queries and keys
// swapped, which is what makes the dK/dV pass tile-local (no atomics, nothing growing with the segments).
#pragma once

#include <stdint.h>

#include "../common/host_device.h"

namespace hierkern {
namespace cuda {

struct Interval {
  int begin;
  int end;  // exclusive; begin == end means empty
};

// The segment that holds packed token `token`: the largest s in [0, num_segments) with
// offsets[s] <= token. Zero-length segments never hold a token, and this skips them because it takes the
// largest such s. Requires num_segments >= 1 and offsets[0] <= token < offsets[num_segments].
HK_HOST_DEVICE int find_segment(const int* offsets, int num_segments, int token) {
  int lo = 0, hi = num_segments;  // invariant: offsets[lo] <= token < offsets[hi]
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= token) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// FlashAttention's window_size: query position i of a segment with lq queries and lk keys sees key position
// j iff i + (lk - lq) - left <= j <= i + (lk - lq) + right, a negative side being unbounded.
struct Window {
  int left;
  int right;
};

// clamp(x, 0, hi) for an x formed in 64 bits: a window up to INT32_MAX added to a position can pass 2^31.
HK_HOST_DEVICE int clamp_to(int64_t x, int hi) {
  return x < 0 ? 0 : (x > hi ? hi : static_cast<int>(x));
}

// Packed key tokens visible to packed query token `row`.
HK_HOST_DEVICE Interval keys_of_query(const int* cu_seqlens_q, const int* cu_seqlens_k, int num_segments, int row,
                                      Window window) {
  const int s = find_segment(cu_seqlens_q, num_segments, row);
  const int q0 = cu_seqlens_q[s], lq = cu_seqlens_q[s + 1] - q0;
  const int k0 = cu_seqlens_k[s], lk = cu_seqlens_k[s + 1] - k0;
  // (lk - lq) first: row - q0 + lk alone can pass 2^31 when a segment holds over 2^30 queries and keys.
  const int64_t diagonal = static_cast<int64_t>(row - q0 + (lk - lq));
  const int first = window.left < 0 ? 0 : clamp_to(diagonal - window.left, lk);
  const int last = window.right < 0 ? lk : clamp_to(diagonal + window.right + 1, lk);
  return Interval{k0 + first, k0 + last};
}

// Packed query tokens that see packed key token `col` (the transpose of keys_of_query).
HK_HOST_DEVICE Interval queries_of_key(const int* cu_seqlens_q, const int* cu_seqlens_k, int num_segments, int col,
                                       Window window) {
  const int s = find_segment(cu_seqlens_k, num_segments, col);
  const int q0 = cu_seqlens_q[s], lq = cu_seqlens_q[s + 1] - q0;
  const int k0 = cu_seqlens_k[s], lk = cu_seqlens_k[s + 1] - k0;
  const int64_t diagonal = static_cast<int64_t>(col - k0 - (lk - lq));
  const int first = window.right < 0 ? 0 : clamp_to(diagonal - window.right, lq);
  const int last = window.left < 0 ? lq : clamp_to(diagonal + window.left + 1, lq);
  return Interval{q0 + first, q0 + last};
}

}  // namespace cuda
}  // namespace hierkern
