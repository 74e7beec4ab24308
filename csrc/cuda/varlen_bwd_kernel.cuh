// Backward, as two deterministic, atomic-free passes that mirror the forward's schedule:
//
//   dq pass   grid (ceil(total_q / kRows), num_heads): a CTA owns query rows and streams the union of their
//             key intervals (tile_union.cuh) twice (once when it fits one block): first for
//             delta_i = sum_j P_ij Z_ij dout_i.v_j, stored for the next pass, then to accumulate
//             dq = scale * sum_j dS_ij k_j in registers.
//   dk/dv pass grid (ceil(total_k / kRows), num_kv_heads): a CTA owns key rows, streams the union of the
//             query intervals that see them for every query head of its GQA group and accumulates
//             dv = sum_i Z_ij P_ij dout_i and dk = scale * sum_i dS_ij q_i in registers.
//
// with P_ij = exp(scale q_i.k_j - lse_i) recomputed from the forward's lse, Z the dropout keep-and-rescale
// factor, and dS_ij = P_ij (Z_ij dout_i.v_j - delta_i). Because every row owns its accumulator, there are
// no atomics and no scratch beyond delta, which grows with the tokens, not the segments.
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
    varlen_bwd_dq_kernel(const BwdArgs args, uint32_t drop_threshold, float drop_scale) {
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
  const bool live = row < args.total_q;
  const bool dropout = args.dropout_p > 0.f;

  const Interval keys =
      live ? keys_of_query(args.cu_seqlens_q, args.cu_seqlens_k, args.num_segments, row, args.window) : kNoRow;

  float q[kElems], dout[kElems], dq[kElems];
  float lse_log2 = 0.f;
#pragma unroll
  for (int e = 0; e < kElems; ++e) dq[e] = 0.f;
  if (live) {
    load_elems(
        head_ptr<T>(args.q, head, args.q_head_stride) + static_cast<int64_t>(row) * args.q_token_stride + lane_elem, q);
    load_elems(head_ptr<T>(args.dout, head, args.dout_head_stride) +
                   static_cast<int64_t>(row) * args.dout_token_stride + lane_elem,
               dout);
    lse_log2 = args.lse[static_cast<int64_t>(head) * args.total_q + row] * kLog2e;
  } else {
#pragma unroll
    for (int e = 0; e < kElems; ++e) q[e] = dout[e] = 0.f;
  }
  const float scale_log2 = args.softmax_scale * kLog2e;

  const Interval slots = build_tile_union(tile, local, lane_elem == 0, keys);

  // Calls body(p, keep, dp, k) for each key of this row in the staged slots [block, block + count): P
  // recomputed from lse, keep the dropout factor Z (0 or 1 / (1 - p_drop)), dp = dout.v, k the key in fp32
  // registers. The trip count is warp-uniform so that the shuffles in lane_sum see every lane; a lane past
  // its row's keys computes on row 0 of the block but never uses the result (nor multiplies it by 0).
  auto for_each_key = [&](int block, int count, auto&& body) {
    const int first = max(slots.begin, block) - block;
    const int mine = max(min(slots.end, block + count) - block - first, 0);
    const int steps = __reduce_max_sync(0xffffffffu, mine);
    for (int t = 0; t < steps; ++t) {
      const bool valid = t < mine;
      const int r = valid ? first + t : 0;
      float kv[kElems];
      load_elems(&v_block[r][lane_elem], kv);
      const float dp = lane_sum<L::kLanesPerRow>(dot_elems(dout, kv));
      load_elems(&k_block[r][lane_elem], kv);
      const float score = lane_sum<L::kLanesPerRow>(dot_elems(q, kv));
      if (valid) {
        const float p = exp2f(fmaf(score, scale_log2, -lse_log2));
        float keep = 1.f;
        if (dropout) {
          const int key = keys.begin + (block + r - slots.begin);
          keep = dropout_keep(args.seed, args.offset, head, row, key, drop_threshold) ? drop_scale : 0.f;
        }
        body(p, keep, dp, kv);
      }
    }
  };
  // delta_i = sum_j P_ij Z_ij dp_ij, in fp32 from the recomputed P and dp, before any
  // dS_ij = P_ij (Z_ij dp_ij - delta_i) is formed. Mathematically it is dout_i . out_i, but out is rounded to
  // the input dtype, and under a peaky softmax dS is a small difference of close numbers: the rounding of
  // out alone cost dq and dk up to 5x the error of an fp32-accumulating reference in bf16/fp16.
  float delta = 0.f;
  const auto add_to_delta = [&](float p, float keep, float dp, const float (&)[kElems]) {
    delta = fmaf(p, keep * dp, delta);
  };
  const auto add_to_dq = [&](float p, float keep, float dp, const float (&k)[kElems]) {
    const float ds = p * fmaf(keep, dp, -delta);
#pragma unroll
    for (int e = 0; e < kElems; ++e) dq[e] = fmaf(ds, k[e], dq[e]);
  };

  const T* k_head = head_ptr<T>(args.k, kv_head, args.k_head_stride);
  const T* v_head = head_ptr<T>(args.v, kv_head, args.v_head_stride);
  // A tile whose keys fit one block (words) stages it once for both sums; longer spans stream it twice.
  const bool one_block = tile.size <= L::kBlock;
  if (!one_block) {
    for (int block = 0; block < tile.size; block += L::kBlock) {
      const int count = min(L::kBlock, tile.size - block);
      stage_slots<T, HeadDim>(k_block, k_head, args.k_token_stride, tile, block, count);
      stage_slots<T, HeadDim>(v_block, v_head, args.v_token_stride, tile, block, count);
      __syncthreads();
      for_each_key(block, count, add_to_delta);
      __syncthreads();
    }
  }
  for (int block = 0; block < tile.size; block += L::kBlock) {
    const int count = min(L::kBlock, tile.size - block);
    stage_slots<T, HeadDim>(k_block, k_head, args.k_token_stride, tile, block, count);
    stage_slots<T, HeadDim>(v_block, v_head, args.v_token_stride, tile, block, count);
    __syncthreads();
    if (one_block) for_each_key(block, count, add_to_delta);
    for_each_key(block, count, add_to_dq);
    __syncthreads();
  }

  if (live) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) dq[e] *= args.softmax_scale;
    T* dst = static_cast<T*>(args.dq) + (static_cast<int64_t>(row) * args.num_heads + head) * HeadDim;
    store_elems(dst + lane_elem, dq);
    if (lane_elem == 0) args.delta[static_cast<int64_t>(head) * args.total_q + row] = delta;
  }
}

template <typename T, int HeadDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    varlen_bwd_dkdv_kernel(const BwdArgs args, uint32_t drop_threshold, float drop_scale) {
  using L = Layout<T, HeadDim>;
  alignas(16) __shared__ T q_block[L::kBlock][HeadDim];
  alignas(16) __shared__ T dout_block[L::kBlock][HeadDim];
  __shared__ float lse_block[L::kBlock];
  __shared__ float delta_block[L::kBlock];
  __shared__ TileUnion<L::kRows> tile;

  const int kv_head = blockIdx.y;
  const int group = args.num_heads / args.num_kv_heads;
  const int col0 = blockIdx.x * L::kRows;
  const int local = static_cast<int>(threadIdx.x) / L::kLanesPerRow;
  const int col = col0 + local;
  const int lane_elem = (static_cast<int>(threadIdx.x) % L::kLanesPerRow) * kElems;
  const bool live = col < args.total_k;
  const bool dropout = args.dropout_p > 0.f;

  const Interval queries =
      live ? queries_of_key(args.cu_seqlens_q, args.cu_seqlens_k, args.num_segments, col, args.window) : kNoRow;

  float k[kElems], v[kElems], dk[kElems], dv[kElems];
#pragma unroll
  for (int e = 0; e < kElems; ++e) dk[e] = dv[e] = 0.f;
  if (live) {
    load_elems(
        head_ptr<T>(args.k, kv_head, args.k_head_stride) + static_cast<int64_t>(col) * args.k_token_stride + lane_elem,
        k);
    load_elems(
        head_ptr<T>(args.v, kv_head, args.v_head_stride) + static_cast<int64_t>(col) * args.v_token_stride + lane_elem,
        v);
  } else {
#pragma unroll
    for (int e = 0; e < kElems; ++e) k[e] = v[e] = 0.f;
  }
  const float scale_log2 = args.softmax_scale * kLog2e;
  const Interval slots = build_tile_union(tile, local, lane_elem == 0, queries);

  // Query heads in a fixed order: the GQA reduction into dk/dv is deterministic.
  for (int head = kv_head * group; head < (kv_head + 1) * group; ++head) {
    const T* q_head = head_ptr<T>(args.q, head, args.q_head_stride);
    const T* dout_head = head_ptr<T>(args.dout, head, args.dout_head_stride);
    for (int block = 0; block < tile.size; block += L::kBlock) {
      const int count = min(L::kBlock, tile.size - block);
      stage_slots<T, HeadDim>(q_block, q_head, args.q_token_stride, tile, block, count);
      stage_slots<T, HeadDim>(dout_block, dout_head, args.dout_token_stride, tile, block, count);
      for (int i = threadIdx.x; i < count; i += kThreads) {
        const int64_t at = static_cast<int64_t>(head) * args.total_q + staged_token(tile, block + i);
        lse_block[i] = args.lse[at] * kLog2e;
        delta_block[i] = args.delta[at];
      }
      __syncthreads();
      const int first = max(slots.begin, block) - block;
      const int mine = max(min(slots.end, block + count) - block - first, 0);
      const int steps = __reduce_max_sync(0xffffffffu, mine);
      for (int t = 0; t < steps; ++t) {
        const bool valid = t < mine;
        const int r = valid ? first + t : 0;
        float qx[kElems], gx[kElems];
        load_elems(&q_block[r][lane_elem], qx);
        const float score = lane_sum<L::kLanesPerRow>(dot_elems(qx, k));
        load_elems(&dout_block[r][lane_elem], gx);
        const float dp = lane_sum<L::kLanesPerRow>(dot_elems(gx, v));
        if (valid) {
          const float p = exp2f(fmaf(score, scale_log2, -lse_block[r]));
          float keep = 1.f;
          if (dropout) {
            const int query = queries.begin + (block + r - slots.begin);
            keep = dropout_keep(args.seed, args.offset, head, query, col, drop_threshold) ? drop_scale : 0.f;
          }
          const float pv = p * keep;
          const float ds = p * fmaf(keep, dp, -delta_block[r]);
#pragma unroll
          for (int e = 0; e < kElems; ++e) {
            dv[e] = fmaf(pv, gx[e], dv[e]);
            dk[e] = fmaf(ds, qx[e], dk[e]);
          }
        }
      }
      __syncthreads();
    }
  }

  if (live) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) dk[e] *= args.softmax_scale;
    const int64_t at = (static_cast<int64_t>(col) * args.num_kv_heads + kv_head) * HeadDim + lane_elem;
    store_elems(static_cast<T*>(args.dk) + at, dk);
    store_elems(static_cast<T*>(args.dv) + at, dv);
  }
}

}  // namespace cuda
}  // namespace hierkern
