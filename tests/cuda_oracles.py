"""Oracles for the CUDA backend's tests: the dropout model (hierkern/philox.py, the specification that
csrc/common/philox.h implements) and a dense float64 attention that applies an explicit keep mask. The
host tests check the C++ RNG against the model and the published known-answer vectors; the GPU and emulation
tests rebuild the exact mask a kernel applied and compare the kernel's outputs and gradients with the dense
attention under that mask. ``rowwise_attention`` is the float64 oracle for non-finite inputs: every row's
output and gradients over its visible keys only."""

from __future__ import annotations

import math

import torch

from hierkern.philox import dropout_threshold, keep_mask, philox4x32_10  # noqa: F401  (the tests' model)

from helpers import Layout, offsets_of


def window_of(mask: bool | tuple[int, int]) -> tuple[int, int]:
    """FlashAttention's ``window_size`` (left, right), -1 unbounded, from a window or a causal flag:
    causal is (-1, 0), no mask (-1, -1)."""
    if isinstance(mask, bool):
        return (-1, 0) if mask else (-1, -1)
    return mask


def visibility(layout: Layout, mask: bool | tuple[int, int]) -> torch.Tensor:
    """Bool ``(total_q, total_k)``: whether packed query i sees packed key j: the segment mask and the sliding
    window ``mask`` (a causal flag or (left, right)), bottom-right aligned: query position i of a segment
    with lq queries and lk keys sees key position j iff i + lk - lq - left <= j <= i + lk - lq + right."""
    left, right = window_of(mask)
    lq, lk = torch.tensor(layout.lengths_q), torch.tensor(layout.keys)
    n = len(layout.lengths_q)
    ids_q, ids_k = torch.repeat_interleave(torch.arange(n), lq), torch.repeat_interleave(torch.arange(n), lk)
    pos_q = torch.arange(len(ids_q)) - offsets_of(layout.lengths_q)[:-1].long()[ids_q]
    pos_k = torch.arange(len(ids_k)) - offsets_of(layout.keys)[:-1].long()[ids_k]
    allowed = ids_q[:, None] == ids_k[None, :]
    diagonal = pos_q[:, None] + (lk - lq)[ids_q][:, None]
    if left >= 0:
        allowed &= pos_k[None, :] >= diagonal - left
    if right >= 0:
        allowed &= pos_k[None, :] <= diagonal + right
    return allowed


def dense_attention(
    q,
    k,
    v,
    layout: Layout,
    mask: bool | tuple[int, int],
    softmax_scale: float,
    keep: torch.Tensor | None = None,
    p: float = 0.0,
) -> torch.Tensor:
    """Differentiable attention over all packed tokens at once with the block-diagonal and window (or
    causal) mask (``visibility``), and dropout given as an explicit keep mask ``(H, total_q, total_k)``:
    ``out = (P * keep / (1 - p)) v``. Rows with no visible key give zeros."""
    allowed = visibility(layout, mask)
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, 1)) * softmax_scale
    has_keys = allowed.any(-1)[None, :, None]
    # Rows without keys get finite dummy scores, then are zeroed: no NaN in the forward or the backward.
    scores = scores.masked_fill(~allowed, -math.inf).masked_fill(~has_keys, 0.0)
    probs = torch.softmax(scores, -1) * has_keys
    if keep is not None:
        probs = probs * keep / (1 - p)
    return torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(group, 1))


def rowwise_attention(q, k, v, dout, layout: Layout, mask: bool | tuple[int, int], softmax_scale: float):
    """Forward and backward in float64 with every sum taken over visible (query, key) pairs only, so that an
    inf or NaN reaches exactly the rows, keys and gradients IEEE arithmetic carries it to: a masked pair
    contributes nothing, not ``0 * x``. P = exp(s - logsumexp(s)) over each row's visible keys, as in
    tests/conformance/oracle.py: scores all -inf give NaN, a +inf score NaN for that key and 0 for the
    others. Returns float64 ``out, lse (H, total_q), dq, dk, dv``; rows with no visible key give zeros and
    lse = -inf."""
    q, k, v, dout = (t.detach().double() for t in (q, k, v, dout))
    group = q.shape[1] // k.shape[1]
    kh, vh = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (total_k, H, D)
    seen = visibility(layout, mask)[None]  # (1, total_q, total_k)

    def visible_sum(terms, dim):  # terms (H, total_q, total_k, D)
        return torch.where(seen[..., None], terms, 0.0).sum(dim)

    scores = torch.einsum("qhd,khd->hqk", q, kh) * softmax_scale
    lse = torch.logsumexp(torch.where(seen, scores, -math.inf), -1)
    probs = torch.where(seen, torch.exp(scores - lse[..., None]), 0.0)
    out = visible_sum(probs[..., None] * vh.transpose(0, 1)[:, None], 2).transpose(0, 1)  # (total_q, H, D)

    dprobs = torch.einsum("qhd,khd->hqk", dout, vh)
    delta = torch.where(seen, probs * dprobs, 0.0).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta)
    dq = visible_sum(dscores[..., None] * kh.transpose(0, 1)[:, None], 2).transpose(0, 1) * softmax_scale
    dk = visible_sum(dscores[..., None] * q.transpose(0, 1)[:, :, None], 1).transpose(0, 1) * softmax_scale
    dv = visible_sum(probs[..., None] * dout.transpose(0, 1)[:, :, None], 1).transpose(0, 1)
    fold = lambda g: g.unflatten(1, (k.shape[1], group)).sum(2)  # GQA: sum a group's query heads
    return out, lse, dq, fold(dk), fold(dv)
