"""How a ``hierkern.MultiheadAttention`` call runs: validating a padded call's masks, and planning the varlen
path's segments (from host-readable masks, or on the device without reading them).

The module's own forward lives in ``mha.py``; the encoder (``encoder.py``) shares the mask helpers.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import Segments, host_readable

__all__ = [
    "CAUSAL_NEEDS_MASK",
    "Plan",
    "canonical_mask",
    "check_mask",
    "check_tensor",
    "is_causal_mask",
    "plan_call",
    "prefix_padding",
    "sync_free_plan",
    "uniform_segments",
]

CAUSAL_NEEDS_MASK = (
    "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
    "method `generate_square_subsequent_mask` to create this mask."
)


@dataclass
class Plan:
    """How one call runs: ``reason is None`` means the varlen path with these segments."""

    reason: str | None
    seg_q: Segments | None = None
    seg_k: Segments | None = None
    causal: bool = False
    strip_queries: bool = False
    # The sync-free layout (masks not host-readable): rows stay padded, ``order`` (N, S) puts each row's
    # valid keys first (a stable sort, so any key padding mask works), and ``pad`` (N, L) marks the padded
    # query rows to zero in self-attention.
    order: Tensor | None = None
    pad: Tensor | None = None


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_mask(name: str, mask) -> None:
    check_tensor(name, mask)
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")


def canonical_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask as an additive float mask of ``dtype`` (True -> -inf); a float mask, of any dtype,
    unchanged. As torch's ``F.canonical_mask``."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def check_sdpa_mask_dtype(
    key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool, dtype: torch.dtype
) -> None:
    """Refuse, for a ``need_weights=False`` call, the masks torch refuses. torch adds them (a bool mask as
    a float mask of the query's ``dtype``; ``attn_mask`` dropped for ``is_causal`` without padding) and
    hands the sum to ``scaled_dot_product_attention``, which takes a float mask only as float32 or
    ``dtype``."""
    masks = {"key_padding_mask": key_padding_mask}
    if key_padding_mask is not None or not is_causal:
        masks["attn_mask"] = attn_mask
    given = {name: mask.dtype for name, mask in masks.items() if mask is not None}
    if not given:
        return
    merged = functools.reduce(torch.promote_types, (dtype if d == torch.bool else d for d in given.values()))
    if merged not in (torch.float32, dtype):
        described = " + ".join(f"{name} ({d})" for name, d in given.items())
        raise TypeError(
            f"{described} gives a {merged} attention mask; torch's attention takes a "
            f"floating-point mask only as torch.float32 or the query's dtype ({dtype})"
        )


def prefix_padding(kpm: Tensor) -> Tensor | None:
    """The bool padding mask of an additive ``(N, S)`` mask that only holds 0 (keep) and -inf (pad), with
    the kept tokens a prefix of every row; ``None`` for any other mask."""
    pad = kpm == float("-inf")
    if not bool(((kpm == 0) | pad).all()):
        return None
    if kpm.shape[1] > 1 and bool((pad[:, :-1] & ~pad[:, 1:]).any()):
        return None
    return pad


def offsets_of(lengths: Tensor) -> Tensor:
    """int32 ``cu_seqlens`` ``(numel + 1,)`` of a tensor of segment lengths, computed on its device."""
    return F.pad(lengths.flatten().cumsum(0), (1, 0)).to(torch.int32)


def uniform_segments(num: int, length: int, device: torch.device) -> Segments:
    """``num`` segments of ``length`` tokens each, built on ``device`` without host arithmetic on tensors
    (so ``torch.compile`` traces it and CUDA needs no copy)."""
    offsets = torch.arange(num + 1, dtype=torch.int32, device=device) * length
    return Segments(offsets, length, num * length, validate=False)


def is_causal_mask(mask: Tensor) -> bool:
    """Whether an additive ``(L, L)`` or ``(B, L, L)`` mask is exactly the causal mask (-inf above the
    diagonal, 0 elsewhere)."""
    length = mask.shape[-1]
    if mask.shape[-2] != length:
        return False
    above = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu_(1)
    return bool(torch.where(above, mask == float("-inf"), mask == 0).all())


def plan_call(mha, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, warn: bool = True) -> Plan:
    """Validate a padded call of ``hierkern.MultiheadAttention`` ``mha`` and choose its path. Warns (with
    ``warn``) about mismatched mask types as torch does, but only for the varlen path: torch's own forward warns
    on its path."""
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
        return Plan("nested-tensor inputs run torch's own nested path (hierkern's packed form is segments=)")
    mha._check_common(query, key, value)
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be (L, E) unbatched or 3-D batched, got shape {tuple(query.shape)}")
    batched = query.dim() == 3
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(f"{name} must be {query.dim()}-D like query, got shape {tuple(t.shape)}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"key and value must agree in every dimension but the last, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if batched:
        batch_dim, seq_dim = (0, 1) if mha.batch_first else (1, 0)
        n, tgt_len, src_len = query.shape[batch_dim], query.shape[seq_dim], key.shape[seq_dim]
        if key.shape[batch_dim] != n:
            raise ValueError(
                f"query has batch size {n} but key has {key.shape[batch_dim]} (batch_first={mha.batch_first})"
            )
    else:
        n, tgt_len, src_len = 1, query.shape[0], key.shape[0]
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and attn_mask is None:
        raise RuntimeError(CAUSAL_NEEDS_MASK)

    if key_padding_mask is not None:
        check_mask("key_padding_mask", key_padding_mask)
        expected = (n, src_len) if batched else (src_len,)
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(f"key_padding_mask must have shape {expected}, got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        check_mask("attn_mask", attn_mask)
        shapes = [(tgt_len, src_len), (n * mha.num_heads, tgt_len, src_len)]
        if tuple(attn_mask.shape) not in shapes:
            raise ValueError(f"attn_mask must have shape {shapes[0]} or {shapes[1]}, got {tuple(attn_mask.shape)}")
    if not need_weights:
        # With need_weights torch's own path runs, and raises its own error.
        check_sdpa_mask_dtype(key_padding_mask, attn_mask, is_causal, query.dtype)
    mismatched = key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype
    bool_padding = None
    if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
        bool_padding = key_padding_mask
    key_padding_mask = canonical_mask(key_padding_mask, query.dtype)
    attn_mask = canonical_mask(attn_mask, query.dtype)
    for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if mask is not None and mask.device != query.device:
            raise ValueError(f"{name} is on {mask.device} but query is on {query.device}")

    if need_weights:
        return Plan("need_weights=True returns the attention weights, which only torch's path materialises")
    reason = mha._static_reason()
    if reason is not None:
        return Plan(reason)

    self_attention = query is key and key is value
    # Masks on a GPU, or any mask under torch.compile, are planned without reading their values:
    # reading them would sync the device (or break the graph).
    readable = host_readable(query)
    # torch (multi_head_attention_forward): with is_causal and no key_padding_mask, attn_mask is
    # replaced by SDPA's causal flag; otherwise attn_mask is what masks and is_causal is only a hint.
    if is_causal and key_padding_mask is None:
        causal = True
    elif attn_mask is None:
        causal = False
    elif not readable:
        if not is_causal:
            return Plan(
                "attn_mask without is_causal=True on a GPU or under torch.compile: telling "
                "whether it is the causal mask would read it on the host"
            )
        # torch documents is_causal as the caller's promise that attn_mask is the causal mask.
        causal = True
    elif is_causal_mask(attn_mask):
        causal = True
    else:
        return Plan("attn_mask is neither None nor the causal mask")
    if causal and tgt_len != src_len:
        return Plan(
            f"causal masking with L={tgt_len} != S={src_len}: torch aligns it top-left, varlen_attention bottom-right"
        )
    if key_padding_mask is not None and causal and not self_attention:
        return Plan(
            "causal masking with key padding in cross-attention: the causal diagonal would "
            "move with each row's key length"
        )
    if key_padding_mask is not None and not readable:
        if bool_padding is None:
            return Plan(
                "a float key_padding_mask on a GPU or under torch.compile: telling whether it "
                "holds only 0 and -inf would read it on the host (pass a bool mask)"
            )
        plan = sync_free_plan(bool_padding.reshape(n, src_len), tgt_len, causal, self_attention)
    elif key_padding_mask is not None:
        pad = prefix_padding(key_padding_mask.reshape(n, src_len))
        if pad is None:
            return Plan("key_padding_mask is not prefix padding (0/False for a prefix of each row, -inf/True after it)")
        seg_k = Segments.from_mask(pad)
        if self_attention:
            plan = Plan(None, seg_k, seg_k, causal, strip_queries=True)
        else:
            plan = Plan(None, uniform_segments(n, tgt_len, query.device), seg_k, causal)
    else:
        seg_k = uniform_segments(n, src_len, query.device)
        seg_q = seg_k if tgt_len == src_len else uniform_segments(n, tgt_len, query.device)
        plan = Plan(None, seg_q, seg_k, causal)
    if warn and mismatched:
        warnings.warn(
            "Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for both instead.",
            stacklevel=3,
        )
    return plan


def sync_free_plan(pad: Tensor, tgt_len: int, causal: bool, self_attention: bool) -> Plan:
    """Plan a bool ``(N, S)`` key padding mask without reading it on the host.

    The rows stay padded (``N * L`` query and ``N * S`` key rows; the padded width bounds every
    segment). A stable sort of each row puts its valid keys first in their order (the identity for a
    prefix mask; any mask works, causal ones too, since ranks among the valid keys keep their order).
    Row ``i`` then becomes three segments on each side, with offsets computed on the device:

    * queries ``[a_i, L - a_i, 0]`` (``a_i`` = the valid count in self-attention, else ``L``),
    * keys    ``[n_i, 0, S - n_i]`` (``n_i`` = the valid count),

    so the valid queries attend to the valid keys, padded queries to no key (zeros, at no cost), and
    the padded keys are nobody's.
    """
    n, src_len = pad.shape
    valid = (~pad).sum(1)
    zeros = torch.zeros_like(valid)
    queries = valid if self_attention else torch.full_like(valid, tgt_len)
    seg_q = Segments(
        offsets_of(torch.stack([queries, tgt_len - queries, zeros], 1)), tgt_len, n * tgt_len, validate=False
    )
    seg_k = Segments(offsets_of(torch.stack([valid, zeros, src_len - valid], 1)), src_len, n * src_len, validate=False)
    order = torch.sort(pad.to(torch.uint8), dim=1, stable=True).indices
    return Plan(
        None, seg_q, seg_k, causal, strip_queries=self_attention, order=order, pad=pad if self_attention else None
    )
