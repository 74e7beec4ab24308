"""hierkern's one dropout specification: Philox4x32-10, the attention-weight and the element counter layouts.

Every backend drops the same attention weights for the same ``rng_state``: the C++ kernels
(``csrc/common/philox.h``, vectorised in ``csrc/cpu/impl_dropout.h``), the Triton kernels, and the reference
backend, which computes its mask with :func:`attention_keep` below. The tests rebuild every kernel's mask with
this module.

* ``rng_state`` is int64 ``[seed, offset]``; :func:`rng_state` draws it from torch's generator.
* Attention weight (head ``h``, packed query token ``i``, packed key token ``j``) draws Philox4x32-10 with counter
  ``(i, j, h, offset mod 2^32)`` and key ``(seed mod 2^32, (seed >> 32) ^ (offset >> 32))`` (all 32-bit).
* It is kept iff the first output word is ``>= dropout_threshold(p)``, ``floor(float32(p) * 2^32)``; kept weights
  are scaled by ``1 / (1 - p)``. The softmax normaliser and ``lse`` are the undropped ones.
* Element ``i`` (row-major) of a tensor under ``hierkern::dropout`` / ``dropout_add`` (``csrc/cpu/dropout_impl.h``,
  :func:`element_keep`) is decided by output word ``(i mod 32) // 8`` of the draw with counter
  ``(b mod 2^32, b >> 32, 0xFFFFFFFF, offset mod 2^32)``, ``b = 8 * (i // 32) + i mod 8``, and the same key, kept
  iff that word is ``>=`` the same threshold: one draw decides four elements, and eight draws 32 consecutive
  ones in eight-lane vector code. The tag ``0xFFFFFFFF`` is never a head, so element draws never repeat
  attention draws.

Philox (Salmon et al., SC'11) is counter-based: a draw is a pure function of its counter and key, so forward and
backward regenerate the mask without storing it, whatever tile, thread or lane visits the weight.
"""

from __future__ import annotations

import torch

__all__ = [
    "philox4x32_10",
    "philox4x32_10_words",
    "dropout_threshold",
    "attention_keep",
    "keep_mask",
    "element_keep",
    "rng_state",
]

M0, M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def philox4x32_10(ctr: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """One Philox4x32-10 block for a scalar counter and key (Python ints); the known-answer form."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(ROUNDS):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _MASK32, p1 & _MASK32, ((p0 >> 32) ^ c3 ^ k1) & _MASK32, p0 & _MASK32
        k0, k1 = (k0 + W0) & _MASK32, (k1 + W1) & _MASK32
    return c0, c1, c2, c3


def _mulhilo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A 32x32 -> 64-bit product overflows int64: multiply by the 16-bit halves of m.
    m_lo, m_hi = m & 0xFFFF, m >> 16
    a = x * m_lo  # < 2^48
    b = x * m_hi  # < 2^48
    lo_full = a + ((b & 0xFFFF) << 16)  # < 2^49
    return ((b >> 16) + (lo_full >> 32)) & _MASK32, lo_full & _MASK32


def philox4x32_10_words(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 over int64 tensors of 32-bit counters (broadcast together): the four output words."""
    c0, c1, c2, c3 = (t & _MASK32 for t in torch.broadcast_tensors(c0, c1, c2, c3))
    k0, k1 = k0 & _MASK32, k1 & _MASK32
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(c0, M0)
        hi1, lo1 = _mulhilo(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & _MASK32, (k1 + W1) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """A draw is kept iff it is ``>=`` this: ``floor(float32(p) * 2^32)``, at most ``2^32 - 1``."""
    t = float(torch.tensor(p, dtype=torch.float32)) * 4294967296.0
    return _MASK32 if t >= 4294967295.0 else int(t)


def _seed_offset(state) -> tuple[int, int]:
    if isinstance(state, torch.Tensor):
        if state.dtype != torch.int64 or state.numel() != 2:
            raise ValueError(
                f"rng_state must be an int64 tensor [seed, offset], got {state.dtype} {tuple(state.shape)}"
            )
        seed, offset = (int(x) for x in state.tolist())
    else:
        seed, offset = state
    return seed & _MASK64, offset & _MASK64


def attention_keep(state, heads: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, p: float) -> torch.Tensor:
    """Bool, broadcast over int64 ``heads``, packed ``queries`` and ``keys``: whether weight (head, query, key)
    is kept under ``state`` (an rng_state tensor or ``(seed, offset)``) at dropout probability ``p``."""
    seed, offset = _seed_offset(state)
    word = philox4x32_10_words(
        queries,
        keys,
        heads,
        torch.tensor(offset & _MASK32, device=queries.device),
        seed & _MASK32,
        (seed >> 32) ^ (offset >> 32),
    )[0]
    return word >= dropout_threshold(p)


def keep_mask(seed: int, offset: int, num_heads: int, total_q: int, total_k: int, p: float) -> torch.Tensor:
    """Bool ``(num_heads, total_q, total_k)``: whether every backend keeps weight (head, query, key)."""
    arange = lambda n: torch.arange(n, dtype=torch.int64)  # noqa: E731
    return attention_keep(
        (seed, offset),
        arange(num_heads)[:, None, None],
        arange(total_q)[None, :, None],
        arange(total_k)[None, None, :],
        p,
    )


ELEMENT_TAG = 0xFFFFFFFF  # counter word 2 of element draws; attention draws put a head (< 2^31) there


def element_keep(state, numel: int, p: float) -> torch.Tensor:
    """Bool ``(numel,)``: whether element dropout keeps element ``i`` (row-major) under ``state`` (an rng_state
    tensor or ``(seed, offset)``) at probability ``p``."""
    seed, offset = _seed_offset(state)
    i = torch.arange(numel, dtype=torch.int64)
    block = 8 * (i // 32) + i % 8
    words = philox4x32_10_words(
        block,
        block >> 32,
        torch.tensor(ELEMENT_TAG),
        torch.tensor(offset & _MASK32),
        seed & _MASK32,
        (seed >> 32) ^ (offset >> 32),
    )
    return torch.stack(words).gather(0, ((i % 32) // 8)[None])[0] >= dropout_threshold(p)


def rng_state(device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh int64 ``[seed, offset]`` drawn from torch's generator for ``device``, on that device, with no
    host sync (on CUDA, drawn on the device: safe under CUDA-graph capture)."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)
