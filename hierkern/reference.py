"""Pure-PyTorch varlen attention: the semantics every backend must reproduce, and the fallback backend.

Semantics (FlashAttention's varlen convention):

* ``q`` ``(total_q, H, D)``, ``k``/``v`` ``(total_k, H_kv, D)`` packed by ``cu_seqlens_q``/``cu_seqlens_k``;
  query segment ``i`` attends only to key segment ``i``. Query head ``h`` reads key/value head
  ``h // (H // H_kv)`` (GQA/MQA).
* ``window_size=(left, right)``: query ``i`` of a segment with ``Lq`` queries and ``Lk`` keys sees key ``j``
  iff ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (bottom-right alignment), a bound of -1 being
  unbounded; causal is ``(-1, 0)``, no mask ``(-1, -1)``.
* A query that sees no key returns zeros and ``lse = -inf``; finite inputs never give a NaN.
* A token's value reaches only the outputs and gradients of the rows that attend to it: a NaN or an inf
  follows IEEE arithmetic in those rows (as a float64 computation over each row's visible keys would) and
  leaves every other row exactly as it would be otherwise.
* Both matmuls accumulate in float32 for half-precision inputs (float64 for float64) and the softmax runs
  in that precision; the probabilities are rounded to the input dtype before ``P @ V`` and the output once
  at the end (what an fp32-accumulating kernel sees); ``lse`` is float32 ``(H, total_q)`` and carries no
  gradient.
* ``dropout_p`` drops probabilities after the softmax and rescales by ``1 / (1 - dropout_p)``; which weights
  drop is ``hierkern.philox``'s function of ``rng_state``, the same as every kernel's.

Vectorised: segments are bucketed by (query length, key length) rounded up to a power of two and each bucket
is one batched matmul, so the cost is within ~4x of the useful work and there is no Python loop over segments.
A masked segment that holds a NaN or an inf is split into one problem per query row (see ``_units``).
It reads the offsets on the host, so on CUDA tensors every call syncs: kernels exist to avoid that.
"""

from __future__ import annotations

import math

import torch

from . import philox

__all__ = ["varlen_attention_reference"]


def _length_buckets(lengths_q: torch.Tensor, lengths_k: torch.Tensor) -> torch.Tensor:
    """Bucket id per unit: ceil(log2(len)) for queries and keys combined into one integer."""

    def ceil_log2(lengths: torch.Tensor) -> torch.Tensor:
        return torch.ceil(torch.log2(lengths.clamp(min=1).double())).long()

    return ceil_log2(lengths_q) * 64 + ceil_log2(lengths_k)


def _non_finite_per_segment(t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per segment of ``offsets`` (host int64), whether any of its tokens in ``t`` holds a NaN or an inf."""
    bad = (~torch.isfinite(t.detach())).flatten(1).any(1).to("cpu", torch.int64)
    counts = torch.cat([bad.new_zeros(1), bad.cumsum(0)])
    return (counts[offsets[1:]] - counts[offsets[:-1]]) > 0


def _units(q, k, v, offsets_q, offsets_k, window_size):
    """The independent attention problems, as host int64 ``(q_start, q_len, k_start, k_len, masked)``.

    A unit is a segment, except that a masked segment holding a non-finite value is split into one unit per
    query row over exactly the keys that row sees (``masked`` 0: no window left to apply). The batched matmuls
    below multiply every masked score and weight by zero, and ``0 * inf`` is NaN: splitting keeps a NaN or an
    inf away from the rows that do not attend to it, in the forward and in autograd's backward alike.
    """
    q0, k0 = offsets_q[:-1], offsets_k[:-1]
    lq, lk = offsets_q.diff(), offsets_k.diff()
    masked = tuple(window_size) != (-1, -1)
    flags = torch.full_like(lq, int(masked))
    if not masked:
        return q0, lq, k0, lk, flags
    split = (
        _non_finite_per_segment(q, offsets_q)
        | _non_finite_per_segment(k, offsets_k)
        | _non_finite_per_segment(v, offsets_k)
    ) & (lq > 0)
    if not bool(split.any()):
        return q0, lq, k0, lk, flags
    rows_per_seg = torch.where(split, lq, 0)
    seg = torch.repeat_interleave(torch.arange(lq.numel()), rows_per_seg)
    row = torch.arange(seg.numel()) - torch.repeat_interleave(rows_per_seg.cumsum(0) - rows_per_seg, rows_per_seg)
    lo, hi = _key_range(row, lq[seg], lk[seg], window_size)
    keep = ~split
    return (
        torch.cat([q0[keep], q0[seg] + row]),
        torch.cat([lq[keep], torch.ones_like(row)]),
        torch.cat([k0[keep], k0[seg] + lo]),
        torch.cat([lk[keep], hi - lo]),
        torch.cat([flags[keep], torch.zeros_like(row)]),
    )


def _key_range(row, len_q, len_k, window_size):
    """The keys ``[lo, hi)`` of its segment that query ``row`` sees (tensors broadcast; ``hi >= lo``)."""
    left, right = window_size
    centre = row + len_k - len_q  # bottom-right alignment
    lo = torch.zeros_like(centre) if left < 0 else (centre - left).clamp(min=0)
    hi = len_k + 0 * centre if right < 0 else (centre + right + 1).clamp(min=0).minimum(len_k)
    lo = lo.minimum(len_k)
    return lo, hi.maximum(lo)


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference varlen attention. Inputs are assumed validated (see ``hierkern.varlen_attention``).

    Args:
        q: ``(total_q, H, D)``.
        k, v: ``(total_k, H_kv, D)``, ``H % H_kv == 0``.
        cu_seqlens_q, cu_seqlens_k: int ``(S + 1,)`` offsets.
        softmax_scale: multiplies ``q @ k^T``; ``None`` means ``1 / sqrt(D)``.
        causal: the same as ``window_size=(left, 0)``.
        window_size: ``(left, right)`` keys around each row's bottom-right aligned diagonal, -1 unbounded;
            ``(-1, 0)`` is causal.
        dropout_p: probability of dropping an attention weight.
        rng_state: int64 ``[seed, offset]`` choosing the dropped weights (``hierkern.philox``); ``None`` draws
            one from torch's generator.

    Returns:
        ``out`` ``(total_q, H, D)`` in ``q.dtype`` and ``lse`` ``(H, total_q)`` float32.
    """
    total_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    device = q.device
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    window_size = (window_size[0], 0) if causal else tuple(window_size)
    offsets_q = cu_seqlens_q.detach().to("cpu", torch.int64)
    offsets_k = cu_seqlens_k.detach().to("cpu", torch.int64)
    start_q, lengths_q, start_k, lengths_k, unit_masked = _units(q, k, v, offsets_q, offsets_k, window_size)
    if dropout_p > 0.0 and rng_state is None:
        rng_state = philox.rng_state()
    buckets = _length_buckets(lengths_q, lengths_k)

    row_index, row_out, row_lse = [], [], []
    for bucket in torch.unique(buckets).tolist():
        seg = torch.nonzero(buckets == bucket).flatten()
        seg_lq, seg_lk = lengths_q[seg], lengths_k[seg]
        max_q, max_k = int(seg_lq.max()), int(seg_lk.max())
        if max_q == 0 or max_k == 0:
            continue  # no query rows, or no keys: those rows keep their zero output and -inf lse
        pos_q, pos_k = torch.arange(max_q), torch.arange(max_k)
        valid_q = pos_q[None, :] < seg_lq[:, None]  # (n, Lq)
        valid_k = pos_k[None, :] < seg_lk[:, None]  # (n, Lk)
        idx_q = torch.where(valid_q, start_q[seg, None] + pos_q, 0)
        idx_k = torch.where(valid_k, start_k[seg, None] + pos_k, 0)
        allowed = valid_k[:, None, :].expand(-1, max_q, -1)  # (n, Lq, Lk)
        lo, hi = _key_range(pos_q[None, :, None], seg_lq[:, None, None], seg_lk[:, None, None], window_size)
        inside = (pos_k[None, None, :] >= lo) & (pos_k[None, None, :] < hi)
        allowed = allowed & (inside | ~unit_masked[seg, None, None].bool())
        idx_q_dev, idx_k_dev = idx_q.to(device), idx_k.to(device)
        valid_q_dev, valid_k_dev = valid_q.to(device)[..., None, None], valid_k.to(device)[..., None, None]

        # Upcast before the matmuls: a half-precision einsum would round the scores to half precision,
        # which no fp32-accumulating kernel does. Padding slots gather token 0, so they are zeroed with a
        # select (not a product): a NaN in token 0 must not reach another segment's padding.
        qb = torch.where(valid_q_dev, q[idx_q_dev].to(compute_dtype), 0.0)  # (n, Lq, H, D)
        kb = torch.where(valid_k_dev, k[idx_k_dev].to(compute_dtype), 0.0).repeat_interleave(group, dim=2)
        vb = torch.where(valid_k_dev, v[idx_k_dev].to(compute_dtype), 0.0).repeat_interleave(group, dim=2)
        scores = torch.einsum("nqhd,nkhd->nhqk", qb, kb) * scale
        mask = allowed.to(device)[:, None, :, :]  # (n, 1, Lq, Lk)
        scores = scores.masked_fill(~mask, float("-inf"))
        # The max shift is mathematically neutral; detaching it keeps -inf rows out of autograd.
        row_max = scores.detach().amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        exp = torch.exp(scores - row_max)
        denom = exp.sum(-1, keepdim=True)
        probs = exp / torch.where(denom > 0, denom, torch.ones_like(denom))
        # Keys that all score -inf (an infinite input) make softmax 0/0: NaN, as IEEE says. Only a row with no
        # visible key at all is defined as zeros.
        probs = torch.where((denom == 0) & mask.any(-1, keepdim=True), math.nan, probs)
        lse = (row_max + torch.log(denom.detach())).squeeze(-1)  # (n, H, Lq), -inf if no keys
        if dropout_p > 0.0:
            heads = torch.arange(num_heads, device=device)[None, :, None, None]
            keep = philox.attention_keep(
                rng_state, heads, idx_q_dev[:, None, :, None], idx_k_dev[:, None, None, :], dropout_p
            )
            # A product, as in the kernels: a dropped NaN weight stays NaN (IEEE), it is not selected away.
            probs = probs * (keep.to(probs.dtype) * (1.0 / (1.0 - dropout_p)))
        probs = probs.to(q.dtype).to(compute_dtype)
        out = torch.einsum("nhqk,nkhd->nqhd", probs, vb).to(q.dtype)  # (n, Lq, H, D)

        valid_dev = valid_q.to(device)
        row_index.append(idx_q_dev[valid_dev])
        row_out.append(out[valid_dev])
        row_lse.append(lse.transpose(1, 2)[valid_dev])  # (rows, H)

    if not row_index:
        # No query sees a key. Route zero-size slices of q, k and v into the output anyway, so that autograd
        # returns zero gradients instead of failing with "does not require grad".
        row_index.append(torch.zeros(0, dtype=torch.long, device=device))
        row_out.append(q[:0] + (k[:0].sum() + v[:0].sum()).to(q.dtype))
        row_lse.append(torch.zeros(0, num_heads, dtype=torch.float32, device=device))

    out = q.new_zeros(total_q, num_heads, head_dim)
    lse = torch.full((total_q, num_heads), float("-inf"), dtype=torch.float32, device=device)
    index = torch.cat(row_index)
    out = out.index_put((index,), torch.cat(row_out))
    lse = lse.index_put((index,), torch.cat(row_lse).float())
    return out, lse.t().contiguous()
