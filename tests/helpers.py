"""Shared test utilities: adversarial layouts, random inputs, the float64 oracle, error metrics.

Every suite compares against ``oracle_attention``, the conformance oracle (a per-row loop in float64 on the
CPU: slow and obviously right), or against ``hierkern.reference`` evaluated in float64.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from conformance import oracle


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
    """docs/design.md's list (Testing): lengths 0 and 1, tile size +-1, one long segment among tiny ones, all length-1,
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


def random_qkv(
    layout: Layout,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype=torch.float32,
    device="cpu",
    generator: torch.Generator | None = None,
    requires_grad: bool = False,
):
    total_q, total_k = sum(layout.lengths_q), sum(layout.keys)
    make = lambda n, h: (
        torch.randn(n, h, head_dim, generator=generator, dtype=torch.float64)
        .to(device=device, dtype=dtype)
        .requires_grad_(requires_grad)
    )
    return make(total_q, num_heads), make(total_k, num_kv_heads), make(total_k, num_kv_heads)


def oracle_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False):
    """The conformance oracle (tests/conformance/oracle.py) on detached inputs: ``(out (total_q, H, D),
    lse (H, total_q))`` float64."""
    return oracle.attention(
        q.detach(), k.detach(), v.detach(), cu_seqlens_q.cpu(), cu_seqlens_k.cpu(), softmax_scale, causal
    )


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64 (0 when both are zero)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff if denom == 0 else diff / denom
