"""``varlen_attention``: argument validation and backend dispatch. No math lives here."""

from __future__ import annotations

import math
import numbers

import torch

from . import (
    ops,  # noqa: F401  (registers the compiled backends)
    philox,
)
from .backends import AttentionCall, VarlenArgs, select_backend
from .backends import explain as explain_call
from .layout import Segments, check_offsets, host_readable

__all__ = ["varlen_attention", "explain"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _resolve_offsets(
    cu_seqlens, max_seqlen, total: int, device: torch.device, name: str, max_name: str, tensor_name: str
) -> tuple[torch.Tensor, int]:
    """Offsets as an int32 tensor on ``device`` plus a validated host ``max_seqlen``."""
    if isinstance(cu_seqlens, Segments):
        if cu_seqlens.total != total:
            raise ValueError(f"{name} covers {cu_seqlens.total} tokens but {tensor_name} has {total}")
        offsets = cu_seqlens.offsets
        if max_seqlen is None:
            max_seqlen = cu_seqlens.max_len
    elif isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 tensor (or a Segments), got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"{name} must be 1-D of shape (S + 1,), got {tuple(cu_seqlens.shape)}")
        offsets = cu_seqlens
        if host_readable(offsets):
            check_offsets(offsets, name, total)
    else:
        raise TypeError(f"{name} must be an int32 tensor or a hierkern.Segments, got {type(cu_seqlens).__name__}")
    if offsets.device != device:
        raise ValueError(f"{name} is on {offsets.device} but q is on {device}")
    # Kernels read offsets with unit stride; a strided view (e.g. every other entry) is valid input. The copy
    # is S + 1 ints and needs no sync.
    offsets = offsets.to(torch.int32).contiguous()
    return offsets, _check_max_seqlen(max_seqlen, offsets, name, max_name)


def _check_max_seqlen(max_seqlen, offsets: torch.Tensor, name: str, max_name: str) -> int:
    """A validated host ``max_seqlen`` for ``offsets``, read from them (a sync on CUDA) when ``None``."""
    longest = None
    if max_seqlen is None:
        # The one case that syncs a CUDA caller: pass max_seqlen or a Segments to avoid it.
        longest = int(offsets.diff().max()) if offsets.numel() > 1 else 0
        max_seqlen = longest
    # A SymInt is what an int argument becomes under torch.compile with dynamic shapes.
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"{max_name} must be a Python int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{max_name} must be non-negative, got {max_seqlen}")
    if longest is None and host_readable(offsets) and offsets.numel() > 1:
        longest = int(offsets.diff().max())
        if longest > max_seqlen:
            raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest segment in {name} ({longest})")
    return max_seqlen


def _check_window(window_size, causal: bool) -> tuple[int, int]:
    """``window_size`` as a ``(left, right)`` tuple of ints >= -1, with ``causal`` folded in (right = 0)."""
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, (int, torch.SymInt)) and not isinstance(w, bool) for w in window_size)
    ):
        raise TypeError(f"window_size must be a tuple of two ints (left, right), got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"window_size bounds must be >= 0, or -1 for unbounded, got {tuple(window_size)}")
    if causal:
        if right > 0:
            raise ValueError(f"causal=True means window_size=(left, 0); got window_size={tuple(window_size)}")
        right = 0
    return left, right


def _resolve(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size, dropout_p
):
    """Validate a call as ``varlen_attention`` takes it: ``(offsets_q, offsets_k, softmax_scale, call)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (total, heads, head_dim), got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError("head_dim must be positive")
    if q.shape[1] == 0:
        raise ValueError("q must have at least one head")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"the number of query heads ({q.shape[1]}) must be a multiple of the number of "
            f"key/value heads ({k.shape[1]})"
        )
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
        softmax_scale = float(softmax_scale)
    else:
        softmax_scale = 1.0 / math.sqrt(q.shape[2])
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    window_size = _check_window(window_size, causal)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")

    offsets_q, max_seqlen_q = _resolve_offsets(
        cu_seqlens_q, max_seqlen_q, q.shape[0], q.device, "cu_seqlens_q", "max_seqlen_q", "q"
    )
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError(
                f"cu_seqlens_k is None (keys packed like the queries) but k has {k.shape[0]} "
                f"tokens and q has {q.shape[0]}"
            )
        offsets_k = offsets_q
        max_seqlen_k = (
            max_seqlen_q
            if max_seqlen_k is None
            else _check_max_seqlen(max_seqlen_k, offsets_k, "cu_seqlens_q", "max_seqlen_k")
        )
    else:
        offsets_k, max_seqlen_k = _resolve_offsets(
            cu_seqlens_k, max_seqlen_k, k.shape[0], q.device, "cu_seqlens_k", "max_seqlen_k", "k"
        )
    if offsets_k.shape[0] != offsets_q.shape[0]:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of segments, got "
            f"{offsets_q.shape[0] - 1} and {offsets_k.shape[0] - 1}"
        )

    call = AttentionCall.of(q, k, v, max_seqlen_q, max_seqlen_k, window_size=window_size, dropout_p=float(dropout_p))
    return offsets_q, offsets_k, softmax_scale, call


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | Segments,
    cu_seqlens_k: torch.Tensor | Segments | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Fused masked-softmax attention over every packed segment at once.

    Query segment ``i`` (tokens ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``) attends to key segment ``i`` only.

    Args:
        q: ``(total_q, H, D)`` queries, float16/bfloat16/float32/float64.
        k: ``(total_k, H_kv, D)`` keys, ``H % H_kv == 0`` (GQA/MQA), same dtype and device as ``q``.
        v: ``(total_k, H_kv, D)`` values.
        cu_seqlens_q: int32 (or int64) ``(S + 1,)`` query offsets of any stride, or a ``hierkern.Segments``.
        cu_seqlens_k: key offsets (``(S + 1,)`` or ``Segments``); ``None`` means the same as the queries.
        max_seqlen_q: longest query segment (host int). ``None`` takes it from a ``Segments``, or reads
            the offsets (a device sync for CUDA offsets).
        max_seqlen_k: longest key segment, likewise.
        softmax_scale: scale of ``q @ k^T``; ``None`` means ``1 / sqrt(D)``.
        causal: causal mask, aligned bottom-right when a segment's query and key lengths differ; the same as
            ``window_size=(left, 0)``.
        window_size: ``(left, right)``: query ``i`` of a segment with ``Lq`` queries and ``Lk`` keys sees key
            ``j`` iff ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``; -1 is unbounded on that side
            (FlashAttention's and ``torch.nn.attention.varlen.varlen_attn``'s meaning). Keys outside a row's
            window are never read.
        dropout_p: dropout probability on the attention weights (pass 0.0 in evaluation). Which weights drop
            is ``hierkern.philox``'s function of a seed drawn from torch's generator: the same on every backend.
        return_lse: also return the log-sum-exp of the scaled scores.
        backend: ``"auto"`` (the fastest backend that supports the call), ``"reference"``, ``"cpu"``,
            ``"triton"`` or ``"cuda"``.

    Returns:
        ``out`` ``(total_q, H, D)`` in ``q.dtype``; with ``return_lse`` also ``lse`` ``(H, total_q)``
        float32 (no gradient). A query with no visible key gets zeros and ``lse = -inf``, never NaN.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    offsets_q, offsets_k, softmax_scale, call = _resolve(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size, dropout_p
    )
    impl = select_backend(call, backend)
    rng_state = None
    if call.dropout:
        rng_state = philox.rng_state(q.device if impl.capabilities.rng_on_device else "cpu")
    out, lse = impl(
        VarlenArgs(
            q,
            k,
            v,
            offsets_q,
            offsets_k,
            call.max_seqlen_q,
            call.max_seqlen_k,
            softmax_scale,
            call.window_size,
            float(dropout_p),
            rng_state,
        )
    )
    return (out, lse) if return_lse else out


def explain(
    q: torch.Tensor | AttentionCall,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | Segments | None = None,
    cu_seqlens_k: torch.Tensor | Segments | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    dropout_p: float = 0.0,
) -> dict[str, str | None]:
    """Which backend would run ``varlen_attention`` with these arguments, and why each other one would not.

    Takes the arguments of :func:`varlen_attention` (validated the same way; nothing is computed or compiled),
    or one ``hierkern.AttentionCall``.

    Returns:
        ``{backend name: None if it accepts the call, else the reason in words}``, highest priority first;
        ``"auto"`` runs the first backend that accepts (on the CPU, Triton's interpreter only when named).
    """
    if isinstance(q, AttentionCall):
        if any(a is not None for a in (k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)):
            raise TypeError("explain takes either one AttentionCall or varlen_attention's arguments, not both")
        return explain_call(q)
    if cu_seqlens_q is None:
        raise TypeError("explain() needs q, k, v and cu_seqlens_q, as varlen_attention does")
    call = _resolve(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size, dropout_p
    )[3]
    return explain_call(call)
