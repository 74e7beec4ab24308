// Forward: out = softmax(scale * q k^T, segment-masked) v and lse, one kernel, one pass over q, k, v.
//
// Grid (ceil(total_q / kRows), num_heads). A CTA owns kRows consecutive query rows of one head, whatever
// segments they belong to; the union of their key intervals (tile_union.cuh) is streamed through shared
// memory in blocks of kBlock keys. Each row runs the online softmax over its own key interval only,
// so rows of different words in one tile never see each other (the block-diagonal mask) and a word's
// queries cost its own keys, not a tile's. No host sync, no scratch, no atomics.
//
// Kernel templates only (launchers in the .cu next to it), so tests/test_cuda_emulation.py can also compile
// them for the host under an emulation of the CUDA execution model.
#pragma once

#include "kernel_utils.cuh"
#include "../common/philox.h"
#include "schedule.cuh"
#include "tile_union.cuh"

namespace hierkern {
namespace cuda {

template <typename T, int HeadDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    varlen_fwd_kernel(const FwdArgs args, uint32_t drop_threshold, float drop_scale) {
  using L = Layout<T, HeadDim>;
  alignas(16) __shared__ T k_block[L::kBlock][HeadDim];
  alignas(16) __shared__ T v_block[L::kBlock][HeadDim];
  __shared__ TileUnion<L::kRows> tile;

  const int head = blockIdx.y;
  const int kv_head = head / (args.num_heads / args.num_kv_heads);
  const int row0 = blockIdx.x * L::kRows;
  const int local = static_cast<int>(threadIdx.x) / L::kLanesPerRow;
  const int row = row0 + local;
  const int lane_elem = (static_cast<int>(threadIdx.x) % L::kLanesPerRow) * kElems;
  // Threads past the last row stay in the loops as rows with no keys: every lane must reach the
  // barriers and the shuffles.
  const bool live = row < args.total_q;
  const bool dropout = args.dropout_p > 0.f;

  const Interval keys =
      live ? keys_of_query(args.cu_seqlens_q, args.cu_seqlens_k, args.num_segments, row, args.window) : kNoRow;

  float q[kElems];
  if (live) {
    load_elems(
        head_ptr<T>(args.q, head, args.q_head_stride) + static_cast<int64_t>(row) * args.q_token_stride + lane_elem, q);
  } else {
#pragma unroll
    for (int e = 0; e < kElems; ++e) q[e] = 0.f;
  }
  float acc[kElems];
#pragma unroll
  for (int e = 0; e < kElems; ++e) acc[e] = 0.f;
  // Running max (log2 domain, scale folded in) and running sum of the online softmax.
  float row_max = -INFINITY, row_sum = 0.f;
  const float scale_log2 = args.softmax_scale * kLog2e;

  const T* k_head = head_ptr<T>(args.k, kv_head, args.k_head_stride);
  const T* v_head = head_ptr<T>(args.v, kv_head, args.v_head_stride);
  const Interval slots = build_tile_union(tile, local, lane_elem == 0, keys);
  for (int block = 0; block < tile.size; block += L::kBlock) {
    const int count = min(L::kBlock, tile.size - block);
    stage_slots<T, HeadDim>(k_block, k_head, args.k_token_stride, tile, block, count);
    stage_slots<T, HeadDim>(v_block, v_head, args.v_token_stride, tile, block, count);
    __syncthreads();
    const int first = max(slots.begin, block) - block;
    const int mine = max(min(slots.end, block + count) - block - first, 0);
    // Warp-uniform trip count so the shuffles in lane_sum see every lane.
    const int steps = __reduce_max_sync(0xffffffffu, mine);
    for (int t = 0; t < steps; ++t) {
      const bool valid = t < mine;
      const int r = valid ? first + t : 0;
      float kv[kElems];
      load_elems(&k_block[r][lane_elem], kv);
      const float score = lane_sum<L::kLanesPerRow>(dot_elems(q, kv)) * scale_log2;
      if (valid) {
        const float new_max = fmaxf(row_max, score);
        // While every score so far is -inf (an infinite input, or a product that overflowed) the shift is 0:
        // -inf - -inf would turn the row NaN where those keys only weigh 0.
        const float shift = new_max == -INFINITY ? 0.f : new_max;
        const float rescale = exp2f(row_max - shift);
        const float p = exp2f(score - shift);
        row_sum = fmaf(row_sum, rescale, p);
        row_max = new_max;
        // Dropout scales P v but not the normaliser: lse stays that of the undropped softmax.
        float weight = p;
        if (dropout) {
          const int key = keys.begin + (block + r - slots.begin);
          weight = dropout_keep(args.seed, args.offset, head, row, key, drop_threshold) ? p * drop_scale : 0.f;
        }
        load_elems(&v_block[r][lane_elem], kv);
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[e] = fmaf(acc[e], rescale, weight * kv[e]);
      }
    }
    __syncthreads();
  }

  if (live) {
    // A row without keys gives zeros and lse = -inf, never 0/0. Any other row follows IEEE arithmetic over its
    // keys, as the float64 oracle does: scores all -inf give 0/0 = NaN and lse = -inf, a NaN score NaN, and a
    // +inf score NaN with lse = +inf (logsumexp's value; the backward then weighs the row's finite keys 0).
    const float inv_sum = keys.end > keys.begin ? 1.f / row_sum : 0.f;
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[e] *= inv_sum;
    T* out = static_cast<T*>(args.out) + (static_cast<int64_t>(row) * args.num_heads + head) * HeadDim;
    store_elems(out + lane_elem, acc);
    if (lane_elem == 0) {
      args.lse[static_cast<int64_t>(head) * args.total_q + row] =
          row_max == INFINITY ? INFINITY : (row_max + log2f(row_sum)) * kLn2;
    }
  }
}

}  // namespace cuda
}  // namespace hierkern
