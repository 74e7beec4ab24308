"""Shared test utilities: the float64 loop oracle, adversarial layouts, error metrics.

Every backend suite compares against ``oracle_attention`` (a per-segment, per-head loop in float64 on the
CPU: slow and obviously right) or against ``hierkern.reference`` evaluated in float64.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """A test layout: query and key segment lengths (equal when ``lengths_k`` is None)."""

    name: str
    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...] | None = None

    @property
    def keys(self) -> tuple[int, ...]:
        return self.lengths_q if self.lengths_k is None else self.lengths_k


def adversarial_layouts(tile: int = 64, seed: int = 0) -> list[Layout]:
    """DESIGN.md's list: lengths 0 and 1, tile size +-1, one long segment among tiny ones, all length-1,
    a single segment, unequal q/k lengths (cross-attention, including keys shorter than queries)."""
    rng = random.Random(seed)
    tiny = tuple(rng.randint(1, 8) for _ in range(23))
    return [
        Layout("empty-and-one", (0, 1, 0, 3, 1, 0)),
        Layout("tile-boundaries", (tile - 1, tile, tile + 1, 1, 2 * tile + 1)),
        Layout("long-among-tiny", tiny[:11] + (3 * tile + 5,) + tiny[11:]),
        Layout("all-length-1", (1,) * 37),
        Layout("single", (tile + 7,)),
        Layout("all-empty", (0, 0, 0)),
        Layout("cross-unequal", (3, 0, 7, tile + 1, 1, 5), (5, 4, 0, tile - 3, 9, 5)),
        Layout("words", tuple(rng.choice((1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 14)) for _ in range(40))),
    ]


def offsets_of(lengths, device="cpu") -> torch.Tensor:
    lengths = torch.as_tensor(list(lengths), dtype=torch.int64)
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32).to(device)


def random_qkv(layout: Layout, num_heads: int, num_kv_heads: int, head_dim: int, dtype=torch.float32,
               device="cpu", generator: torch.Generator | None = None, requires_grad: bool = False):
    total_q, total_k = sum(layout.lengths_q), sum(layout.keys)
    make = lambda n, h: torch.randn(n, h, head_dim, generator=generator, dtype=torch.float64).to(
        device=device, dtype=dtype).requires_grad_(requires_grad)
    return make(total_q, num_heads), make(total_k, num_kv_heads), make(total_k, num_kv_heads)


def oracle_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False):
    """Per-segment, per-head float64 loop. Returns ``(out (total_q, H, D), lse (H, total_q))`` float64."""
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    total_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    oq, ok = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros_like(q)
    lse = torch.full((num_heads, total_q), -math.inf, dtype=torch.float64)
    for i in range(len(oq) - 1):
        a, b, c, d = oq[i], oq[i + 1], ok[i], ok[i + 1]
        lq, lk = b - a, d - c
        if lq == 0 or lk == 0:
            continue
        allowed = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        for h in range(num_heads):
            scores = (q[a:b, h] @ k[c:d, h // group].T) * scale
            scores = scores.masked_fill(~allowed, -math.inf)
            row_lse = torch.logsumexp(scores, -1)
            has_keys = torch.isfinite(row_lse)
            probs = torch.where(has_keys[:, None], torch.exp(scores - row_lse[:, None]), 0.0)
            out[a:b, h] = probs @ v[c:d, h // group]
            lse[h, a:b] = row_lse
    return out, lse


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64 (0 when both are zero)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff if denom == 0 else diff / denom
