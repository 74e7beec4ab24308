"""Hugging Face ``transformers`` models on hierkern: ``attn_implementation="hierkern"``.

After ``register()`` (``import hierkern`` calls it when ``transformers`` is already imported)::

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="hierkern")
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True)    # padding-free batches

Two functions are registered under the name, as transformers expects of an attention implementation:

* ``hierkern_mask`` in ``AttentionMaskInterface``. The model calls it once per forward to build its mask. It
  computes nothing: it returns a ``MaskRequest`` holding the call's arguments. Without a registered mask
  function transformers would skip mask creation for the name and pass ``None``, dropping the padding.
* ``hierkern_attention_forward`` in ``AttentionInterface``, called by every attention layer. It runs
  ``hierkern.varlen_attention`` on one of four layouts:

  - ``varlen-packed``: ``cu_seq_lens_q/k`` and ``max_length_q/k`` given (``DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)``). The flattened tokens are the kernel's input as they are; no copy and no
    host sync.
  - ``varlen-position-ids``: a batch packed by ``position_ids`` alone: transformers' packed-sequence mask
    (decoders without a cache), or, as transformers' FlashAttention path does, positions that restart inside a
    row. Offsets are derived on the device once per forward (one sync on CUDA, to size them).
  - ``varlen-unpadded``: an ``attention_mask`` with padding. The real tokens are gathered (any padding
    pattern: right, left or holes), attend within their row, and are scattered back. Index computation once
    per forward (a sync on CUDA).
  - ``varlen-rows``: no padding (no mask, or a mask of all ones); each batch row is one segment, no gather.

  Sliding windows (Mistral, ModernBERT's local layers, ...) run on every path as ``varlen_attention``'s
  ``window_size=(left, right)``: transformers' causal overlay (keys less than ``sliding_window`` tokens back) is
  ``(sliding_window - 1, 0)``, its bidirectional overlay (distances up to ``sliding_window``) is
  ``(sliding_window, sliding_window)``, and a module's ``sliding_window`` argument, when no mask was built, is
  read as FlashAttention's path reads it, ``(sliding_window - 1, sliding_window - 1)`` (right 0 when causal).
  A window that hides nothing in any segment of the batch is dropped, which keeps such calls on the kernels
  that have no window. Whatever varlen attention cannot compute exactly falls back to the model's own ``sdpa``
  path with the dense mask transformers would have built for it (a ``HierkernFallbackWarning``, once per
  reason): a window over a padding mask with holes inside a row (the window counts the padding between real
  tokens), mask functions other than causal or bidirectional (chunked or image-token masks, custom ``or``/
  ``and`` masks), a precomputed 4-D mask, an additive ``position_bias``, cache layouts whose queries are not the
  last keys (a static cache). Requests it cannot honour at all raise ``ValueError``: attention weights
  (``output_attentions``), logit soft-capping (``softcap``), attention sinks (``s_aux``/``sinks``),
  ``cu_seq_lens_*`` combined with a padding mask or with anything that needs the fallback (sdpa would attend
  across the packed sequences), and a ``sliding_window`` argument with no mask built together with anything
  that needs the fallback (sdpa would drop the window).

``module.hierkern_last_path`` on each attention module says which path its last call took.

Semantics match the model's ``sdpa`` path on every query that is not padding. Causal layers, and layers whose
window hides keys, give padding queries zeros (as ``flash_attention_2`` does); their outputs never reach a real
token, nor a loss whose labels are -100 there. Dropout is applied to the attention probabilities with
rescaling by ``1 / (1 - p)``, as sdpa and FlashAttention do, from hierkern's own random stream.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..functional import varlen_attention

MIN_TRANSFORMERS = (5, 4)  # masks described by q_length/q_offset (5.0-5.3 passed cache_position tensors)

try:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).release < MIN_TRANSFORMERS:
        raise ImportError(f"found transformers {transformers.__version__}")
    from transformers import masking_utils
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import (
        AttentionMaskInterface,
        and_masks,
        bidirectional_mask_function,
        causal_mask_function,
        packed_sequence_mask_function,
        prepare_padding_mask,
    )
    from transformers.modeling_utils import AttentionInterface
except ImportError as exc:
    raise ImportError(
        f"hierkern.integrations.transformers needs transformers>="
        f"{'.'.join(map(str, MIN_TRANSFORMERS))} (pip install 'hierkern[transformers]'): {exc}"
    ) from exc

__all__ = [
    "IMPLEMENTATION",
    "MIN_TRANSFORMERS",
    "HierkernFallbackWarning",
    "MaskRequest",
    "hierkern_attention_forward",
    "hierkern_mask",
    "register",
]

IMPLEMENTATION = "hierkern"


class HierkernFallbackWarning(UserWarning):
    """An attention call ran the model's ``sdpa`` path instead of hierkern's kernels; the message says why."""


def register(name: str = IMPLEMENTATION) -> str:
    """Register hierkern with transformers as ``attn_implementation=name``; idempotent.

    Registers ``hierkern_attention_forward`` in ``AttentionInterface`` and ``hierkern_mask`` in
    ``AttentionMaskInterface`` (class-wide, so every model sees them).

    Returns:
        ``name``, to pass as ``attn_implementation``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    AttentionInterface.register(name, hierkern_attention_forward)
    AttentionMaskInterface.register(name, hierkern_mask)
    return name


# -- what the model's mask function is ---------------------------------------------------------------------

# transformers builds a mask function out of closures (and_masks, packed_sequence_mask_function,
# remap_positions_for_packed_sequence, the sliding-window overlays). Closures made by one ``def`` share its code
# object, so comparing code objects identifies them exactly; a change in transformers makes the pattern
# unrecognised (sdpa fallback), never misread.
_AND_CODE = and_masks(causal_mask_function).__code__
_PACKED_CODE = packed_sequence_mask_function(torch.empty(0)).__code__
_REMAP = getattr(masking_utils, "remap_positions_for_packed_sequence", None)
_REMAP_CODE = _REMAP(causal_mask_function, torch.empty(0)).__code__ if _REMAP is not None else None
# (overlay code, the base it is and-ed with, sliding_window -> window_size): the causal overlay keeps
# ``kv_idx > q_idx - w``, i.e. ``w - 1`` keys back; the bidirectional one keeps ``abs(q_idx - kv_idx) <= w``.
_WINDOWS = [
    (factory(1).__code__, base, to_window)
    for name, base, to_window in (
        ("sliding_window_overlay", causal_mask_function, lambda w: (w - 1, 0)),
        ("sliding_window_bidirectional_overlay", bidirectional_mask_function, lambda w: (w, w)),
    )
    if (factory := getattr(masking_utils, name, None)) is not None
]


class _Pattern(NamedTuple):
    """A mask varlen attention computes: causal or not, within packed sequences (``packed_ids`` ``(B, L)``,
    transformers' sequence index per token) or rows, under a sliding ``window`` (``varlen_attention``'s
    ``window_size``; ``None``: no window)."""

    causal: bool
    packed_ids: torch.Tensor | None = None
    window: tuple[int, int] | None = None


def _cell(fn: Callable, name: str) -> Any:
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def _classify(mask_function: Callable) -> _Pattern | None:
    """The ``_Pattern`` of a mask function varlen attention computes exactly, else ``None``.

    Recognised: ``causal_mask_function``, ``bidirectional_mask_function``, either under transformers' sliding
    window (``and_masks(overlay(w), base)``), and any of those restricted to packed sequences
    (``and_masks([remap_positions(base, position_ids),] packed_sequence_mask_function(ids))``: within a packed
    sequence positions rise by one, so remapped positions order and space tokens as their indices do, and a
    window measured in positions is the same window measured in tokens).
    """
    if mask_function is causal_mask_function:
        return _Pattern(True)
    if mask_function is bidirectional_mask_function:
        return _Pattern(False)
    if getattr(mask_function, "__code__", None) is not _AND_CODE:
        return None
    parts = _cell(mask_function, "mask_functions")
    if len(parts) != 2:
        return None
    first, second = parts
    first_code = getattr(first, "__code__", None)
    for overlay_code, base, to_window in _WINDOWS:
        if first_code is overlay_code and second is base:
            return _Pattern(base is causal_mask_function, window=to_window(_cell(first, "sliding_window")))
    if getattr(second, "__code__", None) is not _PACKED_CODE:
        return None
    if _REMAP_CODE is not None and first_code is _REMAP_CODE:
        first = _cell(first, "mask_function")
    inner = _classify(first)
    if inner is None or inner.packed_ids is not None:
        return None
    return inner._replace(packed_ids=_cell(second, "packed_sequence_mask"))


class _Layout:
    """Packed offsets of one forward: ``cu_q``/``cu_k`` int32 ``(S + 1,)``, host ``max_q``/``max_k``, and
    ``index_q``/``index_k`` int64: the flat ``(B * L)`` positions of the tokens that take part (``None``: all)."""

    __slots__ = ("path", "cu_q", "cu_k", "max_q", "max_k", "index_q", "index_k")

    def __init__(self, path, cu_q, cu_k, max_q, max_k, index_q=None, index_k=None):
        self.path, self.cu_q, self.cu_k, self.max_q, self.max_k = path, cu_q, cu_k, max_q, max_k
        self.index_q, self.index_k = index_q, index_k


def _rows(batch: int, q_len: int, k_len: int, device: torch.device) -> _Layout:
    """One segment per batch row; built on the device from shapes, no sync."""
    rows = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return _Layout("varlen-rows", rows * q_len, rows * k_len, q_len, k_len)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


def _hides_nothing(window: tuple[int, int], causal: bool, longest: int) -> bool:
    """``window`` hides no key from any query in segments of at most ``longest`` queries and keys: the farthest
    key is ``longest - 1`` tokens away (causal queries see only keys behind them)."""
    left, right = window
    return longest - 1 <= left and (causal or longest - 1 <= right)


def _packed(starts: torch.Tensor, path: str) -> _Layout:
    """Offsets from ``starts`` ``(B, L)`` bool (modified), True where a packed sequence begins; column 0 is set
    True: a sequence never spans two rows. One device->host copy on CUDA, for the offsets' size and max length."""
    starts[:, 0] = True
    flat = starts.reshape(-1)
    cu = torch.cat([flat.nonzero().squeeze(1), flat.new_tensor([flat.numel()], dtype=torch.long)])
    cu = cu.to(torch.int32)
    longest = int(cu.diff().max()) if cu.numel() > 1 else 0
    return _Layout(path, cu, cu, longest, longest)


def _unmasked(batch: int, q_len: int, k_len: int, position_ids: torch.Tensor | None, device: torch.device) -> _Layout:
    """No padding mask: rows, or the packed sequences ``position_ids`` describe.

    As FlashAttention's path in transformers does, a row whose positions do not rise by one from token to
    token holds several sequences, each starting where the positions restart. That is what a padding-free
    batch without ``cu_seq_lens`` looks like, and transformers' own mask misses it when a cache is in use.
    """
    if (
        position_ids is None
        or q_len != k_len
        or position_ids.dim() != 2
        or position_ids.shape[1] != q_len
        or position_ids.shape[0] not in (1, batch)
        or q_len < 2
    ):
        return _rows(batch, q_len, k_len, device)
    pos = position_ids.to(device).expand(batch, -1)
    starts = torch.zeros_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return _packed(starts, "varlen-position-ids")


class MaskRequest:
    """The arguments of the model's mask call, kept until an attention layer decides what it needs.

    The model builds its mask once per forward and hands the same object to every layer, so whatever this
    computes (offsets, gather indices, the dense fallback mask) is computed once per forward and cached here.

    Attributes:
        causal: the mask is causal (``None`` when the pattern is not one varlen attention computes).
        window: the mask's sliding window as ``varlen_attention``'s ``window_size`` (``None``: no window).
        unsupported: why varlen attention cannot compute this mask exactly, or ``None``; set by ``layout`` when
            the padding mask shows it.
    """

    def __init__(self, args: dict):
        self.args = args
        pattern = None if args.get("use_vmap") else _classify(args["mask_function"])
        self.causal = None if pattern is None else pattern.causal
        self.window = None if pattern is None else pattern.window
        self._packed_ids = None if pattern is None else pattern.packed_ids
        self._padding = prepare_padding_mask(args["attention_mask"], args["kv_length"], args["kv_offset"])
        self.unsupported = self._why_not(pattern)
        self._layout = None
        self._layout_shape = None  # (batch, q_len, k_len) that _layout was built for
        self._dense = None
        self._dense_built = False

    @property
    def has_padding_mask(self) -> bool:
        """A 2-D ``attention_mask`` came with the call (it may or may not hold padding)."""
        return self._padding is not None

    def _why_not(self, pattern) -> str | None:
        a = self.args
        if pattern is None:
            return (
                "the model's mask is not causal or bidirectional attention (a chunked, image-token or custom "
                "mask function)"
            )
        q_offset, kv_offset = a["q_offset"], a["kv_offset"]
        if not (isinstance(q_offset, int) and isinstance(kv_offset, int)):
            return "cache offsets given as tensors (a static cache)"
        # Causal and windowed varlen attention align queries with the last keys (bottom-right). The model's mask
        # does too exactly when the queries are the last kv_length positions: no cache, or a cache holding only
        # the past (a sliding-window cache included: its kv_offset drops the keys it no longer holds).
        if (self.causal or self.window is not None) and q_offset + a["q_length"] != kv_offset + a["kv_length"]:
            kind = "causal" if self.causal else "windowed"
            return (
                f"{kind} queries at positions {q_offset}..{q_offset + a['q_length'] - 1} are not the last of "
                f"the keys {kv_offset}..{kv_offset + a['kv_length'] - 1} (a static cache or prefix tuning)"
            )
        return None

    def dense(self) -> torch.Tensor | None:
        """The mask the model's ``sdpa`` path would get (``None`` where sdpa relies on ``is_causal``); cached."""
        if not self._dense_built:
            self._dense = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**self.args)
            self._dense_built = True
        return self._dense

    def layout(
        self, batch: int, q_len: int, k_len: int, position_ids: torch.Tensor | None, device: torch.device
    ) -> _Layout | None:
        """Offsets (and gather indices) for varlen attention: built by the first layer, reused by the next ones
        while the shapes stay (rebuilt if a model shares one mask between layers of different key lengths).
        ``None`` when the padding mask is one varlen attention cannot compute; ``unsupported`` says why."""
        if self._layout_shape != (batch, q_len, k_len):
            self._layout_shape = (batch, q_len, k_len)
            if self._padding is not None:
                self._layout = self._unpad(q_len, k_len)
            elif self._packed_ids is not None:
                # transformers' packed-sequence ids: a sequence starts where the id changes.
                ids = self._packed_ids.expand(batch, -1)
                starts = torch.zeros_like(ids, dtype=torch.bool)
                starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
                self._layout = _packed(starts, "varlen-position-ids")
            else:
                self._layout = _unmasked(batch, q_len, k_len, position_ids, device)
        return self._layout

    def _unpad(self, q_len: int, k_len: int) -> _Layout | None:
        a = self.args
        valid_k = self._padding[:, a["kv_offset"] : a["kv_offset"] + k_len]
        if valid_k.shape[1] != k_len:
            raise ValueError(f"the attention mask covers {valid_k.shape[1]} of the {k_len} key positions")
        len_k = valid_k.sum(1, dtype=torch.int32)
        # The window counts columns, padding included; gathered, a row's real tokens keep their distances only
        # when they are contiguous (padding on either side, not between them).
        windowed = self.window is not None and not _hides_nothing(self.window, self.causal, max(q_len, k_len))
        # Causal: a padded query has no place in the causal order of its row; it is left out (zeros out).
        # Windowed: bottom-right alignment places a row's real queries over its real keys; a padded one has no
        # place among them either.
        # Bidirectional: every query row attends to its row's real keys, as sdpa's mask says.
        gather_q = self.causal or windowed
        valid_q = self._padding[:, a["q_offset"] : a["q_offset"] + q_len] if gather_q else None
        len_q = valid_q.sum(1, dtype=torch.int32) if gather_q else None
        counts = [len_q, len_k] if gather_q else [len_k]
        if windowed:
            # Runs of real tokens per row: a run starts at column 0 or after a padding column.
            counts.append(valid_k[:, 0].to(torch.int32) + (valid_k[:, 1:] & ~valid_k[:, :-1]).sum(1, dtype=torch.int32))
        host = torch.stack(counts).cpu()  # one copy for all of them
        if windowed and bool((host[-1] > 1).any()):
            self.unsupported = "a sliding window over a padding mask with padding between the real tokens of a row"
            return None
        host_k = host[1 if gather_q else 0]
        if bool((host_k == k_len).all()) and (not gather_q or bool((host[0] == q_len).all())):
            # A mask without padding (all ones): the rows as they are, no gather.
            return _rows(len_k.numel(), q_len, k_len, len_k.device)
        max_k = int(host_k.max())
        if gather_q:
            cu_q, max_q, index_q = _offsets(len_q), int(host[0].max()), valid_q.reshape(-1).nonzero().squeeze(1)
        else:
            cu_q = torch.arange(len_k.numel() + 1, device=len_k.device, dtype=torch.int32) * q_len
            max_q, index_q = q_len, None
        return _Layout(
            "varlen-unpadded", cu_q, _offsets(len_k), max_q, max_k, index_q, valid_k.reshape(-1).nonzero().squeeze(1)
        )


def hierkern_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> MaskRequest:
    """The ``AttentionMaskInterface`` entry: record the mask request; nothing is computed here.

    Args:
        batch_size, q_length, kv_length, q_offset, kv_offset: the mask's geometry (transformers' names).
        mask_function: transformers' ``(batch, head, q_idx, kv_idx) -> bool`` description of the pattern.
        attention_mask: ``(batch_size, >= kv_length)`` bool, True = a real token, or ``None``.
        **kwargs: the rest of transformers' mask arguments (kept for the sdpa fallback).

    Returns:
        A ``MaskRequest`` that ``hierkern_attention_forward`` turns into offsets.
    """
    return MaskRequest(
        dict(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            **kwargs,
        )
    )


# -- the attention function --------------------------------------------------------------------------------

_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _fallback(module, reason, query, key, value, mask, dropout, scaling, is_causal, kwargs, varlen):
    """Run the model's own sdpa attention, visibly; refuse when packed offsets would be ignored."""
    if varlen["cu_seq_lens_q"] is not None or varlen["cu_seq_lens_k"] is not None:
        raise ValueError(
            f"attn_implementation='hierkern' cannot honour cu_seq_lens_q/cu_seq_lens_k (a padding-free "
            f"batch) together with {reason}; sdpa would attend across the packed sequences"
        )
    warnings.warn(
        f"attn_implementation='hierkern': {reason}; running the model's sdpa attention instead",
        HierkernFallbackWarning,
        stacklevel=3,
    )
    module.hierkern_last_path = f"sdpa: {reason}"
    return sdpa_attention_forward(
        module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def hierkern_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: MaskRequest | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry: one attention layer's call.

    Args:
        module: the attention module (``is_causal``, ``config`` are read from it).
        query: ``(B, H, L_q, D)``.
        key, value: ``(B, H_kv, L_k, D)`` and ``(B, H_kv, L_k, D_v)``, ``H % H_kv == 0`` (GQA runs natively).
        attention_mask: the ``MaskRequest`` from ``hierkern_mask``, ``None``, or a precomputed 4-D mask
            (sdpa fallback).
        dropout: dropout probability on the attention probabilities (the model passes 0 in eval).
        scaling: softmax scale; ``None`` means ``1 / sqrt(D)``.
        sliding_window: used where no mask was built (a built mask carries its own window), as FlashAttention's
            path reads it: ``window_size=(sliding_window - 1, sliding_window - 1)``, right 0 when causal.
        position_bias (in kwargs): sdpa fallback (varlen attention adds no bias).
        softcap, s_aux, sinks (in kwargs), output_attentions (in kwargs or the config): ``ValueError``.
        is_causal: overrides ``module.is_causal`` when no mask was built; a built mask says it itself.
        **kwargs: ``cu_seq_lens_q/k`` (int32 ``(S + 1,)`` on the model's device) and ``max_length_q/k``
            (host ints) of a padding-free batch, which then must have ``B * L_q`` packed tokens; the rest is
            passed on to the sdpa fallback.

    Returns:
        ``(out, None)``: ``out`` ``(B, L_q, H, D_v)`` in ``query.dtype``; padding queries of causal layers get
        zeros.
    """
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        raise ValueError(
            "attn_implementation='hierkern' does not compute attention weights "
            "(output_attentions=True); load the model with attn_implementation='eager' for them"
        )
    if softcap is not None:
        raise ValueError(
            f"attn_implementation='hierkern' does not implement logit soft-capping (softcap={softcap}); "
            "use attn_implementation='eager'"
        )
    if s_aux is not None or kwargs.get("sinks") is not None:
        raise ValueError(
            "attn_implementation='hierkern' does not implement attention sinks (s_aux/sinks); use "
            "attn_implementation='eager' or 'sdpa'"
        )
    varlen = {name: kwargs.pop(name, None) for name in _VARLEN_KWARGS}
    causal_default = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]

    request = attention_mask if isinstance(attention_mask, MaskRequest) else None
    if request is not None:
        window = request.window
    elif sliding_window is not None:
        window = (sliding_window - 1, 0 if causal_default else sliding_window - 1)
    else:
        window = None
    reason = None
    if attention_mask is not None and request is None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"attention_mask must be a hierkern MaskRequest, a tensor or None, got {type(attention_mask).__name__}"
            )
        reason = f"a precomputed {attention_mask.dim()}-D attention mask"
    elif request is not None:
        reason = request.unsupported
    if reason is None and kwargs.get("position_bias") is not None:
        reason = "an additive position_bias"
    if reason is None and request is None and causal_default and q_len != k_len and varlen["cu_seq_lens_q"] is None:
        reason = f"causal attention of {q_len} queries to {k_len} keys without a mask to place them"
    if reason is None:
        if varlen["cu_seq_lens_q"] is not None or varlen["cu_seq_lens_k"] is not None:
            if request is not None and request.has_padding_mask:
                raise ValueError(
                    "attn_implementation='hierkern' got both an attention_mask and cu_seq_lens_q/"
                    "cu_seq_lens_k; a padding-free batch passes only the offsets"
                )
            layout = _varlen_kwargs_layout(varlen, query.device)
        elif request is not None:
            layout = request.layout(batch, q_len, k_len, kwargs.get("position_ids"), query.device)
            reason = request.unsupported
        else:
            layout = _unmasked(batch, q_len, k_len, kwargs.get("position_ids"), query.device)
    causal = request.causal if request is not None else causal_default
    if reason is None and window is not None:
        # Backends without windows refuse any window; one that hides nothing changes nothing and keeps the call
        # on them.
        longest = max(_longest(layout.max_q, layout.cu_q), _longest(layout.max_k, layout.cu_k))
        if _hides_nothing(window, causal, longest):
            window = None
    if reason is not None:
        if (
            request is None
            and attention_mask is None
            and window is not None
            and not _hides_nothing(window, causal, max(q_len, k_len))
        ):
            raise ValueError(
                f"attn_implementation='hierkern' cannot honour sliding_window={sliding_window} "
                f"together with {reason}; sdpa would attend outside the window"
            )
        mask = request.dense() if request is not None else attention_mask
        return _fallback(module, reason, query, key, value, mask, dropout, scaling, is_causal, kwargs, varlen)

    # (B, L, H, D), the projections' memory layout: flattening is free, except where rotary embeddings left
    # q and k in (B, H, L, D) memory (one copy each, as FlashAttention's path makes).
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    v_dim = v.shape[-1]
    if v_dim != head_dim:
        # Values narrower than queries (e.g. MLA): pad them; the padded columns of the output are dropped.
        if v_dim > head_dim:
            raise ValueError(f"value head_dim ({v_dim}) larger than the query head_dim ({head_dim}) is not supported")
        v = torch.nn.functional.pad(v, (0, head_dim - v_dim))
    q = q.reshape(batch * q_len, heads, head_dim)
    k = k.reshape(batch * k_len, k.shape[2], head_dim)
    v = v.reshape(batch * k_len, v.shape[2], head_dim)

    if layout.index_q is not None:
        q = q.index_select(0, layout.index_q)
    if layout.index_k is not None:
        k = k.index_select(0, layout.index_k)
        v = v.index_select(0, layout.index_k)
    out = varlen_attention(
        q,
        k,
        v,
        layout.cu_q,
        layout.cu_k,
        layout.max_q,
        layout.max_k,
        softmax_scale=scaling,
        causal=causal,
        window_size=window or (-1, -1),
        dropout_p=float(dropout),
    )
    if layout.index_q is not None:
        out = out.new_zeros(batch * q_len, heads, head_dim).index_copy(0, layout.index_q, out)
    module.hierkern_last_path = layout.path
    out = out.view(batch, q_len, heads, head_dim)
    return (out if v_dim == head_dim else out[..., :v_dim]), None


def _longest(max_len: int | None, cu: torch.Tensor) -> int:
    """``max_len``, or read from the offsets when the caller gave none (a sync on CUDA)."""
    if max_len is not None:
        return max_len
    return int(cu.diff().max()) if cu.numel() > 1 else 0


def _varlen_kwargs_layout(varlen: dict, device: torch.device) -> _Layout:
    """Offsets of a padding-free batch from FlashAttention's kwargs, checked without reading device values."""
    cu_q = varlen["cu_seq_lens_q"] if varlen["cu_seq_lens_q"] is not None else varlen["cu_seq_lens_k"]
    cu_k = varlen["cu_seq_lens_k"] if varlen["cu_seq_lens_k"] is not None else cu_q
    for name, cu in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be an int32 tensor, got {type(cu).__name__}")
        if cu.device != device:
            raise ValueError(
                f"{name} is on {cu.device} but the model runs on {device}; move the batch to the model's device"
            )
    max_q, max_k = varlen["max_length_q"], varlen["max_length_k"]
    max_q = max_k if max_q is None else max_q
    max_k = max_q if max_k is None else max_k
    # Tensors (transformers' prepare_fa_kwargs_from_position_ids returns 0-d ones) become host ints here: a
    # sync, but once per layer only when the caller chose tensors.
    max_q, max_k = (int(m) if isinstance(m, torch.Tensor) else m for m in (max_q, max_k))
    return _Layout("varlen-packed", cu_q, cu_k, max_q, max_k)
