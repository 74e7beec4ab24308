"""Pure-PyTorch varlen attention: the semantics every backend must reproduce, and the fallback backend.

Semantics (FlashAttention's varlen convention):

* ``q`` ``(total_q, H, D)``, ``k``/``v`` ``(total_k, H_kv, D)`` packed by ``cu_seqlens_q``/``cu_seqlens_k``;
  query segment ``i`` attends only to key segment ``i``. Query head ``h`` reads key/value head
  ``h // (H // H_kv)`` (GQA/MQA).
* ``causal``: query ``i`` of a segment with ``Lq`` queries and ``Lk`` keys sees key ``j`` iff
  ``j <= i + Lk - Lq`` (bottom-right alignment).
* A query that sees no key returns zeros and ``lse = -inf``; nothing is ever NaN.
* Both matmuls accumulate in float32 for half-precision inputs (float64 for float64) and the softmax runs
  in that precision; the probabilities are rounded to the input dtype before ``P @ V`` and the output once
  at the end (what an fp32-accumulating kernel sees); ``lse`` is float32 ``(H, total_q)`` and carries no
  gradient.
* ``dropout_p`` drops probabilities after the softmax and rescales by ``1 / (1 - dropout_p)``, drawing from
  torch's global generator (not bit-compatible with a kernel's counter-based RNG).

Vectorised: segments are bucketed by (query length, key length) rounded up to a power of two and each bucket
is one batched matmul, so the cost is within ~4x of the useful work and there is no Python loop over segments.
It reads the offsets on the host, so on CUDA tensors every call syncs: kernels exist to avoid that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["varlen_attention_reference"]


def _length_buckets(lengths_q: torch.Tensor, lengths_k: torch.Tensor) -> torch.Tensor:
    """Bucket id per segment: ceil(log2(len)) for queries and keys combined into one integer."""
    def ceil_log2(lengths: torch.Tensor) -> torch.Tensor:
        return torch.ceil(torch.log2(lengths.clamp(min=1).double())).long()
    return ceil_log2(lengths_q) * 64 + ceil_log2(lengths_k)


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference varlen attention. Inputs are assumed validated (see ``hierkern.varlen_attention``).

    Args:
        q: ``(total_q, H, D)``.
        k, v: ``(total_k, H_kv, D)``, ``H % H_kv == 0``.
        cu_seqlens_q, cu_seqlens_k: int ``(S + 1,)`` offsets.
        softmax_scale: multiplies ``q @ k^T``; ``None`` means ``1 / sqrt(D)``.
        causal: bottom-right aligned causal mask.
        dropout_p: probability of dropping an attention weight.

    Returns:
        ``out`` ``(total_q, H, D)`` in ``q.dtype`` and ``lse`` ``(H, total_q)`` float32.
    """
    total_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    device = q.device
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    offsets_q = cu_seqlens_q.detach().to("cpu", torch.int64)
    offsets_k = cu_seqlens_k.detach().to("cpu", torch.int64)
    lengths_q, lengths_k = offsets_q.diff(), offsets_k.diff()
    buckets = _length_buckets(lengths_q, lengths_k)

    row_index, row_out, row_lse = [], [], []
    for bucket in torch.unique(buckets).tolist():
        seg = torch.nonzero(buckets == bucket).flatten()
        seg_lq, seg_lk = lengths_q[seg], lengths_k[seg]
        max_q, max_k = int(seg_lq.max()), int(seg_lk.max())
        if max_q == 0 or max_k == 0:
            continue  # no query rows, or no keys: those rows keep their zero output and -inf lse
        pos_q, pos_k = torch.arange(max_q), torch.arange(max_k)
        valid_q = pos_q[None, :] < seg_lq[:, None]                           # (n, Lq)
        valid_k = pos_k[None, :] < seg_lk[:, None]                           # (n, Lk)
        idx_q = torch.where(valid_q, offsets_q[seg, None] + pos_q, 0)
        idx_k = torch.where(valid_k, offsets_k[seg, None] + pos_k, 0)
        allowed = valid_k[:, None, :].expand(-1, max_q, -1)                  # (n, Lq, Lk)
        if causal:
            shift = (seg_lk - seg_lq)[:, None, None]
            allowed = allowed & (pos_k[None, None, :] <= pos_q[None, :, None] + shift)
        idx_q_dev, idx_k_dev = idx_q.to(device), idx_k.to(device)

        # Upcast before the matmuls: a half-precision einsum would round the scores to half precision,
        # which no fp32-accumulating kernel does.
        qb = q[idx_q_dev].to(compute_dtype)                                  # (n, Lq, H, D)
        kb = k[idx_k_dev].to(compute_dtype).repeat_interleave(group, dim=2)  # (n, Lk, H, D)
        vb = v[idx_k_dev].to(compute_dtype).repeat_interleave(group, dim=2)
        scores = torch.einsum("nqhd,nkhd->nhqk", qb, kb) * scale
        mask = allowed.to(device)[:, None, :, :]                             # (n, 1, Lq, Lk)
        scores = scores.masked_fill(~mask, float("-inf"))
        # The max shift is mathematically neutral; detaching it keeps -inf rows out of autograd.
        row_max = scores.detach().amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        exp = torch.exp(scores - row_max)
        denom = exp.sum(-1, keepdim=True)
        probs = exp / torch.where(denom > 0, denom, torch.ones_like(denom))
        lse = (row_max + torch.log(denom.detach())).squeeze(-1)               # (n, H, Lq), -inf if no keys
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        probs = probs.to(q.dtype).to(compute_dtype)
        out = torch.einsum("nhqk,nkhd->nqhd", probs, vb).to(q.dtype)         # (n, Lq, H, D)

        valid_dev = valid_q.to(device)
        row_index.append(idx_q_dev[valid_dev])
        row_out.append(out[valid_dev])
        row_lse.append(lse.transpose(1, 2)[valid_dev])                       # (rows, H)

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
