"""Python model of the CUDA backend's dropout RNG (csrc/cuda/philox.cuh): Philox4x32-10 and the
(seed, offset, head, query, key) -> keep mapping. The host tests check the C++ against it and against the
published known-answer vectors; the GPU tests use it to rebuild the exact mask a kernel applied."""

from __future__ import annotations

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def philox4x32_10(ctr: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """One Philox4x32-10 block for a scalar counter and key (Python ints)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _MASK32, p1 & _MASK32, ((p0 >> 32) ^ c3 ^ k1) & _MASK32, \
            p0 & _MASK32
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _philox_first_word(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int,
                       k1: int) -> torch.Tensor:
    """First output word of Philox4x32-10 for int64 tensors of 32-bit counters (broadcast together)."""
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(10):
        # 32x32 -> 64-bit products in int64 would overflow; split the multiplier into 16-bit halves.
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0


def _mulhilo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    m_lo, m_hi = m & 0xFFFF, m >> 16
    a = x * m_lo                      # < 2^48
    b = x * m_hi                      # < 2^48
    lo_full = a + ((b & 0xFFFF) << 16)  # < 2^49
    lo = lo_full & _MASK32
    hi = ((b >> 16) + (lo_full >> 32)) & _MASK32
    return hi, lo


def dropout_threshold(p: float) -> int:
    """csrc/cuda/philox.cuh's dropout_threshold: a draw is kept iff it is >= this."""
    t = float(torch.tensor(p, dtype=torch.float32)) * 4294967296.0
    return _MASK32 if t >= 4294967295.0 else int(t)


def keep_mask(seed: int, offset: int, num_heads: int, total_q: int, total_k: int, p: float) -> torch.Tensor:
    """Bool ``(num_heads, total_q, total_k)``: whether the kernel keeps weight (head, query, key)."""
    heads = torch.arange(num_heads, dtype=torch.int64)[:, None, None]
    queries = torch.arange(total_q, dtype=torch.int64)[None, :, None]
    keys = torch.arange(total_k, dtype=torch.int64)[None, None, :]
    seed, offset = seed & 0xFFFFFFFFFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF
    word = _philox_first_word(queries, keys, heads, torch.tensor(offset & _MASK32, dtype=torch.int64),
                              seed & _MASK32, (seed >> 32) ^ (offset >> 32))
    return word >= dropout_threshold(p)
