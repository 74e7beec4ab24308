// The CPU varlen attention kernels. Not a normal header: kernel_<isa>.cpp includes it once inside
// `namespace hierkern::cpu::<isa>` after choosing the code-generation target, so the same source is compiled
// for several instruction sets. It includes only its parts (impl_*.h, by layer, below), and they use only what
// kernel_common.h already included (the standard library, c10's half types, csrc/common/philox.h).
//
// One unit of work is (segment, kv-head). A query row's visible keys are one contiguous range [lo, hi) of the
// segment's keys (visible_keys: the window, aligned bottom-right; causal is the prefix [0, i + Lk - Lq + 1)), and
// the keys outside it are never scored: a row kernel runs over its own range, a block of rows or a batch of
// lanes over the union of its rows' ranges with each row's ends masked.
//
// Float accumulation with head dim 32/64/128 (the fast paths):
// - segments of fewer than kFwdBlockMinKeys (forward) or kBwdBlockMinKeys (backward) keys, i.e. words: eight
//   (query row, head) pairs side by side, one per vector lane, so that a short row's softmax needs no
//   horizontal reduction (fwd_short_segment, bwd_short_segment);
// - forward, longer segments: one head at a time, kBlockRows query rows per block, P @ V for two rows per pass
//   over the values (fwd_block, combine2);
// - backward, segments of at least kBwdBlockMinKeys keys: kBwdRows rows per block, dq = dS @ K two rows at a
//   time and dk/dv as rank updates over the whole block with two keys x 32 columns held in registers
//   (bwd_block, rank_update).
// Everything else (double, other head dims) goes one query row at a time with the row's scores in a per-thread
// buffer; its inner loops are written so the compiler vectorises them (`omp simd` reductions), and exp is
// explicit vector code (exp8).
// bfloat16/float16 inputs: the keys and values of a kv head (of all heads of a short segment) are converted to
// float once, into per-thread scratch of at most kConvertBytes; longer segments are read in place and converted
// as they are read, so that no thread's scratch grows with a long segment's keys times its kv heads.
// Masked keys are skipped or selected away, never multiplied by a zero weight: a token's inf or NaN reaches only
// the rows that attend to it (0 * inf would be NaN).
// Each row's arithmetic keeps the same order whatever the thread count, so results stay bit-identical.

// The parts, by layer; each uses only the ones before it.
#include "impl_vector.h"
#include "impl_dropout.h"
#include "impl_rows.h"
#include "impl_tiles.h"
#include "impl_lanes.h"
#include "impl_blocked.h"
#include "impl_drivers.h"
