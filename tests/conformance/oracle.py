"""The conformance oracle: attention written from its definition, in float64.

It shares no code with ``hierkern.reference``. With finite inputs it is one dense softmax over every packed
token with a block-diagonal mask cut to each row's window: masked scores are -inf, so their weights are exactly
0. With a NaN or an inf anywhere it runs one query row at a time over exactly the keys that row sees (its own
segment's, cut by the bottom-right aligned window), so masked keys never enter any arithmetic: a non-finite
value reaches only the rows that attend to it, and follows IEEE arithmetic there. Obviously right;
differentiable (autograd through float64 ops), including twice.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention", "visible_keys"]


def window_of(causal: bool, window_size=(-1, -1)) -> tuple[int, int]:
    """``(left, right)``, -1 unbounded: FlashAttention's meaning, where causal is ``(left, 0)``."""
    return (window_size[0], 0) if causal else tuple(window_size)


def visible_keys(row: int, len_q: int, len_k: int, window: tuple[int, int]) -> tuple[int, int]:
    """The keys ``[lo, hi)`` of its segment that query ``row`` sees: key ``j`` iff
    ``row + shift - left <= j <= row + shift + right`` with ``shift = len_k - len_q`` (bottom-right)."""
    left, right = window
    centre = row + len_k - len_q
    lo = 0 if left < 0 else max(centre - left, 0)
    hi = len_k if right < 0 else min(max(centre + right + 1, 0), len_k)
    return lo, max(hi, lo)


def attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    softmax_scale=None,
    causal=False,
    keep=None,
    dropout_p=0.0,
    window_size=(-1, -1),
):
    """Varlen attention in float64.

    Args:
        q: ``(total_q, H, D)``; k, v: ``(total_k, H_kv, D)``; converted to float64 (gradients flow back).
        cu_seqlens_q, cu_seqlens_k: ``(S + 1,)`` offsets (any int tensor or list).
        softmax_scale: ``None`` means ``1 / sqrt(D)``.
        causal: bottom-right aligned; the same as ``window_size=(left, 0)``.
        window_size: ``(left, right)`` keys a row sees around its diagonal, -1 unbounded (bottom-right).
        keep: optional ``(total_q, H, max_k)`` bool, the dropout keep-mask by local key position.
        dropout_p: the probability that ``keep`` was drawn with (kept weights scale by ``1 / (1 - p)``).

    Returns:
        ``out`` ``(total_q, H, D)`` and ``lse`` ``(H, total_q)``, float64; rows with no key: 0 and -inf.
    """
    q, k, v = (t.to("cpu", torch.float64) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else softmax_scale
    starts_q = [int(x) for x in cu_seqlens_q]
    starts_k = [int(x) for x in cu_seqlens_k]
    window = window_of(causal, window_size)
    if all(bool(torch.isfinite(t.detach()).all()) for t in (q, k, v)):
        return _dense(q, k, v, starts_q, starts_k, scale, window, keep, dropout_p)
    return _rows(q, k, v, starts_q, starts_k, scale, window, keep, dropout_p)


def _dense(q, k, v, starts_q, starts_k, scale, window, keep, dropout_p):
    """Every query against every key, masked to its segment and its window."""
    total_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    seg_q = torch.repeat_interleave(torch.arange(len(starts_q) - 1), torch.tensor(starts_q).diff())
    seg_k = torch.repeat_interleave(torch.arange(len(starts_k) - 1), torch.tensor(starts_k).diff())
    row = torch.arange(total_q) - torch.tensor(starts_q)[seg_q]
    col = torch.arange(k.shape[0]) - torch.tensor(starts_k)[seg_k]
    seen = seg_q[:, None] == seg_k[None, :]
    centre = row + torch.tensor(starts_k).diff()[seg_q] - torch.tensor(starts_q).diff()[seg_q]
    if window[0] >= 0:
        seen = seen & (col[None, :] >= centre[:, None] - window[0])
    if window[1] >= 0:
        seen = seen & (col[None, :] <= centre[:, None] + window[1])
    has_keys = seen.any(1)  # (total_q,)
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, dim=1)) * scale
    scores = scores.masked_fill(~seen, -math.inf).masked_fill(~has_keys[:, None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)  # (H, total_q)
    probs = torch.exp(scores - lse[..., None]) * has_keys[:, None]
    if keep is not None:
        dense_keep = keep.cpu()[:, :, col.clamp(max=keep.shape[2] - 1)].permute(1, 0, 2) & seen
        probs = torch.where(dense_keep, probs / (1.0 - dropout_p), 0.0)
    out = torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(group, dim=1))
    return out, torch.where(has_keys, lse, -math.inf)


def _rows(q, k, v, starts_q, starts_k, scale, window, keep, dropout_p):
    """One query row at a time, over exactly the keys it sees."""
    total_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    outs, lses = [], []
    for seg in range(len(starts_q) - 1):
        q0, len_q = starts_q[seg], starts_q[seg + 1] - starts_q[seg]
        k0, len_k = starts_k[seg], starts_k[seg + 1] - starts_k[seg]
        for row in range(len_q):
            lo, hi = visible_keys(row, len_q, len_k, window)
            if hi == lo:
                outs.append(q.new_zeros(num_heads, head_dim))
                lses.append(q.new_full((num_heads,), -math.inf))
                continue
            keys = k[k0 + lo : k0 + hi].repeat_interleave(group, dim=1)  # (seen, H, D)
            values = v[k0 + lo : k0 + hi].repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,nhd->hn", q[q0 + row], keys) * scale
            lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - lse[:, None])
            if keep is not None:
                probs = torch.where(keep[q0 + row, :, lo:hi].cpu(), probs / (1.0 - dropout_p), 0.0)
            outs.append(torch.einsum("hn,nhd->hd", probs, values))
            lses.append(lse)
    if not outs:
        return q.new_zeros(0, num_heads, head_dim), q.new_zeros(num_heads, 0)
    return torch.stack(outs), torch.stack(lses).t()
