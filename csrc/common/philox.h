// Counter-based dropout RNG: Philox4x32-10 (Salmon et al., SC'11), the generator behind curand's and
// torch's CUDA dropout, and the one dropout layout of the CPU and CUDA kernels. Counter-based means every
// (head, query, key) draw is a pure function of (seed, offset, head, query, key): forward and backward
// kernels regenerate the same mask with no stored state, whatever tile, thread or vector lane visits the
// element. The CUDA kernels call dropout_keep per element; the CPU kernels run the same rounds in eight
// vector lanes (csrc/cpu/impl_dropout.h) from the constants and the key defined here. HK_HOST_DEVICE and
// torch-free so the host tests can check it against the published known-answer vectors and against the
// Python model the tests use to rebuild the mask (tests/cuda_oracles.py).
#pragma once

#include <stdint.h>

#include "host_device.h"

namespace hierkern {

struct Philox4x32 {
  uint32_t x[4];
};

// The round multipliers and the Weyl increments of the key.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

HK_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

HK_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t key0, uint32_t key1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, ctr.x[0], &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, ctr.x[2], &hi1);
    ctr = Philox4x32{{hi1 ^ ctr.x[1] ^ key0, lo1, hi0 ^ ctr.x[3] ^ key1, lo0}};
    key0 += kPhiloxW0;
    key1 += kPhiloxW1;
  }
  return ctr;
}

// Drop threshold for probability p: an element is kept iff its 32-bit draw is >= the threshold. Both
// backends take it from the float32 dropout_p (the CUDA kernels' argument), so they keep the same weights.
inline uint32_t dropout_threshold(float p) {
  const double t = static_cast<double>(p) * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// The dropout layout. Counter (query, key, head, offset_lo) with query and key packed token indices, key
// (seed_lo, seed_hi ^ offset_hi): distinct (offset, head, query, key) never share a counter as long as a
// caller advances offset between calls. A weight is kept iff the first output word is >= the threshold.
struct PhiloxKey {
  uint32_t k0, k1;
};

HK_HOST_DEVICE PhiloxKey dropout_key(uint64_t seed, uint64_t offset) {
  return PhiloxKey{static_cast<uint32_t>(seed),
                   static_cast<uint32_t>(seed >> 32) ^ static_cast<uint32_t>(offset >> 32)};
}

// Whether dropout keeps attention weight (head, query token, key token) under rng_state [seed, offset].
HK_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t offset, int head, int query, int key, uint32_t threshold) {
  const Philox4x32 ctr{{static_cast<uint32_t>(query), static_cast<uint32_t>(key), static_cast<uint32_t>(head),
                        static_cast<uint32_t>(offset)}};
  const PhiloxKey k = dropout_key(seed, offset);
  const Philox4x32 r = philox4x32_10(ctr, k.k0, k.k1);
  return r.x[0] >= threshold;
}

// The element layout, for dropout on a tensor (csrc/cpu/dropout_impl.h): element i, in row-major order, is
// decided by word (i % 32) / 8 of the draw at counter (b_lo, b_hi, kElementDropoutTag, offset_lo), block
// b = 8 * (i / 32) + i % 8, under dropout_key(seed, offset); kept iff that word is >= the threshold. Each draw
// decides four elements eight apart, so eight consecutive draws cover 32 consecutive elements and an
// eight-lane generator's word w is elements 8w..8w+7 of the chunk, in order. The tag sits where the
// attention layout puts a head, which is below 2^31: an element draw never repeats an attention draw of the
// same rng_state.
constexpr uint32_t kElementDropoutTag = 0xFFFFFFFFu;

}  // namespace hierkern
