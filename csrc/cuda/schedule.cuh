// Work schedule shared by the CUDA kernels: which keys a query row sees, which queries see a key row, and
// which key (or query) range a tile of consecutive rows has to stream. Everything here is __host__
// __device__ and torch-free so tests/test_cuda_build.py compiles it for the host and checks it against a
// Python model of the semantics (hierkern/reference.py) on adversarial layouts.
//
// The whole schedule rests on one fact: under segment masking (plus bottom-right causal masking) the keys a
// query sees form one contiguous interval of packed key tokens, and both ends of that interval are
// non-decreasing in the query index. So a tile of consecutive query rows needs exactly the key range
// [first row's begin, last row's end), found with two binary searches and no host sync, and the
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

HK_HOST_DEVICE int clamp_int(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

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

// Packed key tokens visible to packed query token `row`. Causal is bottom-right aligned: query position
// i of a segment with lq queries and lk keys sees key position j iff j <= i + lk - lq.
HK_HOST_DEVICE Interval keys_of_query(const int* cu_seqlens_q, const int* cu_seqlens_k, int num_segments,
                                      int row, bool causal) {
  const int s = find_segment(cu_seqlens_q, num_segments, row);
  const int q0 = cu_seqlens_q[s], lq = cu_seqlens_q[s + 1] - q0;
  const int k0 = cu_seqlens_k[s], lk = cu_seqlens_k[s + 1] - k0;
  // (lk - lq) first: row - q0 + lk alone can pass 2^31 when a segment holds over 2^30 queries and keys.
  const int visible = causal ? clamp_int(row - q0 + (lk - lq) + 1, 0, lk) : lk;
  return Interval{k0, k0 + visible};
}

// Packed query tokens that see packed key token `col` (the transpose of keys_of_query).
HK_HOST_DEVICE Interval queries_of_key(const int* cu_seqlens_q, const int* cu_seqlens_k, int num_segments,
                                       int col, bool causal) {
  const int s = find_segment(cu_seqlens_k, num_segments, col);
  const int q0 = cu_seqlens_q[s], lq = cu_seqlens_q[s + 1] - q0;
  const int k0 = cu_seqlens_k[s], lk = cu_seqlens_k[s + 1] - k0;
  const int first = causal ? clamp_int(col - k0 - (lk - lq), 0, lq) : 0;
  return Interval{q0 + first, q0 + lq};
}

// Key range a tile of query rows [row0, row0 + rows) must stream (rows >= 1, clipped to total_q by the
// caller). Monotonicity of keys_of_query makes the first row's begin the minimum and the last row's end
// the maximum.
HK_HOST_DEVICE Interval tile_keys(const int* cu_seqlens_q, const int* cu_seqlens_k, int num_segments,
                                  int row0, int rows, bool causal) {
  const Interval first = keys_of_query(cu_seqlens_q, cu_seqlens_k, num_segments, row0, causal);
  const Interval last = keys_of_query(cu_seqlens_q, cu_seqlens_k, num_segments, row0 + rows - 1, causal);
  return Interval{first.begin, last.end};
}

// Query range a tile of key rows [col0, col0 + cols) must stream, likewise.
HK_HOST_DEVICE Interval tile_queries(const int* cu_seqlens_q, const int* cu_seqlens_k, int num_segments,
                                     int col0, int cols, bool causal) {
  const Interval first = queries_of_key(cu_seqlens_q, cu_seqlens_k, num_segments, col0, causal);
  const Interval last = queries_of_key(cu_seqlens_q, cu_seqlens_k, num_segments, col0 + cols - 1, causal);
  return Interval{first.begin, last.end};
}

}  // namespace cuda
}  // namespace hierkern
