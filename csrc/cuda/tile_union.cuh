// The tokens a CTA stages: the union of its rows' intervals (keys of query rows, or queries of key rows),
// packed densely into "slots" so that a token no row of the tile needs is never loaded. Under a sliding
// window a long segment then streams only the blocks its tile's windows touch, and a tile of short words
// skips what lies between their windows (a segment's keys before its first row's window, segments without
// queries).
//
// Built once per CTA with one prefix sum. Both ends of the rows' intervals are non-decreasing (schedule.cuh),
// so rows 0..r-1 cover nothing at or above end_{r-1} and row r adds
// fresh_r = end_r - max(begin_r, end_{r-1}) new tokens, all at the top. With slot_end_r the inclusive prefix
// sum of fresh, row r's own tokens are the contiguous slots [slot_end_r - len_r, slot_end_r), and slot s
// holds token s + shift_r for the first row r with slot_end_r > s.
#pragma once

#include <limits.h>

#include "kernel_utils.cuh"
#include "schedule.cuh"

namespace hierkern {
namespace cuda {

// In shared memory: the kernels read size, first and contiguous from there after every barrier instead of
// holding them in registers (the dk/dv kernel has none to spare).
template <int kRows>
struct TileUnion {
  int begin[kRows];
  int end[kRows];
  int slot_end[kRows];
  int shift[kRows];  // token - slot for row r's fresh tokens
  int size;          // staged tokens
  int first;         // token of slot 0
  // Slot s holds token first + s: tiles without gaps (words under plain or causal masking, a long
  // segment's rows) map slots to tokens by one addition instead of a search.
  bool contiguous;
};

// Rows past the last token: an empty interval above every token keeps the ends non-decreasing and adds
// nothing to the union.
constexpr Interval kNoRow{INT_MAX, INT_MAX};

template <int kRows>
__device__ __forceinline__ int token_of(const TileUnion<kRows>& u, int slot) {
  int lo = 0, hi = kRows - 1;  // the first r with slot_end[r] > slot; slot < slot_end[kRows - 1]
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (u.slot_end[mid] > slot) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return slot + u.shift[lo];
}

// Every thread of the CTA calls this with its row `local` (0..kRows-1) and that row's interval (kNoRow past
// the last token); `writer` is one lane per row. Returns the row's slots.
template <int kRows>
__device__ __forceinline__ Interval build_tile_union(TileUnion<kRows>& u, int local, bool writer, Interval rows) {
  if (writer) {
    u.begin[local] = rows.begin;
    u.end[local] = rows.end;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    // One warp scans; each lane owns kPer consecutive rows.
    constexpr int kPer = (kRows + 31) / 32;
    const int lane = static_cast<int>(threadIdx.x);
    int fresh[kPer], top[kPer], sum = 0, first = -INT_MAX, last = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int r = lane * kPer + i;
      fresh[i] = top[i] = 0;
      if (r < kRows) {
        top[i] = max(u.begin[r], r > 0 ? u.end[r - 1] : u.begin[0]);
        fresh[i] = max(u.end[r] - top[i], 0);
      }
      sum += fresh[i];
      // Tops and ends are non-decreasing: the first fresh token is the lowest, the last row's end the highest.
      if (fresh[i] > 0) {
        first = max(first, -top[i]);
        last = max(last, u.end[r]);
      }
    }
    const int mine = sum;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int below = __shfl_up_sync(0xffffffffu, sum, d);
      if (lane >= d) sum += below;
    }
    int slot = sum - mine;
    const int size = __reduce_max_sync(0xffffffffu, sum);
    first = -__reduce_max_sync(0xffffffffu, first);
    last = __reduce_max_sync(0xffffffffu, last);
    if (lane == 0) {
      u.size = size;
      u.first = first;
      u.contiguous = last - first == size;
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int r = lane * kPer + i;
      if (r < kRows) {
        u.shift[r] = top[i] - slot;
        slot += fresh[i];
        u.slot_end[r] = slot;
      }
    }
  }
  __syncthreads();
  const int end = u.slot_end[local];
  return Interval{end - (rows.end - rows.begin), end};
}

template <int kRows>
__device__ __forceinline__ int staged_token(const TileUnion<kRows>& u, int slot) {
  return u.contiguous ? u.first + slot : token_of(u, slot);
}

// Copies slots [slot0, slot0 + count) of one head of a (tokens, heads, HeadDim) tensor into a dense
// shared-memory block, 16 bytes per thread per step (coalesced along head_dim).
template <typename T, int HeadDim, int kRows>
__device__ __forceinline__ void stage_slots(T (*dst)[HeadDim], const T* base, int64_t token_stride,
                                            const TileUnion<kRows>& u, int slot0, int count) {
  constexpr int kVecs = Layout<T, HeadDim>::kVecsPerRow;
  for (int idx = threadIdx.x; idx < count * kVecs; idx += kThreads) {
    const int r = idx / kVecs, c = idx % kVecs;
    const int token = staged_token(u, slot0 + r);
    reinterpret_cast<uint4*>(dst[r])[c] =
        reinterpret_cast<const uint4*>(base + static_cast<int64_t>(token) * token_stride)[c];
  }
}

}  // namespace cuda
}  // namespace hierkern
